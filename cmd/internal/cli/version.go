package cli

import (
	"context"
	"fmt"
	"io"
	"runtime"
	"runtime/debug"
)

// readBuildInfo is debug.ReadBuildInfo; tests replace it.
var readBuildInfo = debug.ReadBuildInfo

func isVersion(arg string) bool {
	return arg == "version" || arg == "--version" || arg == "-version"
}

func versionCommand(prog string) Command {
	return func(ctx context.Context, args []string, stdout, stderr io.Writer) error {
		if len(args) > 0 {
			return Usagef("version takes no arguments")
		}
		info, _ := readBuildInfo()
		_, err := io.WriteString(stdout, Version(prog, info))
		return err
	}
}

// Version describes the running binary from its build information: the
// main module's version ("(devel)" for a build from a checkout), the VCS
// revision with its commit time and whether the tree had local changes,
// and the Go version and platform. What the build did not record (no build
// information, or VCS stamping off: -buildvcs=false, go test, a tree
// without git) is "unknown".
func Version(prog string, info *debug.BuildInfo) string {
	version, module, goVersion := "unknown", "unknown", runtime.Version()
	revision, vcsTime, modified := "", "", ""
	if info != nil {
		if info.Main.Path != "" {
			module = info.Main.Path
		}
		if info.Main.Version != "" {
			version = info.Main.Version
		}
		if info.GoVersion != "" {
			goVersion = info.GoVersion
		}
		for _, s := range info.Settings {
			switch s.Key {
			case "vcs.revision":
				revision = s.Value
			case "vcs.time":
				vcsTime = s.Value
			case "vcs.modified":
				modified = s.Value
			}
		}
	}
	rev := "unknown"
	if revision != "" {
		rev = revision
		switch {
		case vcsTime != "" && modified == "true":
			rev += " (" + vcsTime + ", modified)"
		case vcsTime != "":
			rev += " (" + vcsTime + ")"
		case modified == "true":
			rev += " (modified)"
		}
	}
	return fmt.Sprintf("%s\nversion:  %s\nmodule:   %s\nrevision: %s\ngo:       %s %s/%s\n",
		prog, version, module, rev, goVersion, runtime.GOOS, runtime.GOARCH)
}
