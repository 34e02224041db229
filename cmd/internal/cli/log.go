package cli

import (
	"io"
	"log/slog"
)

// NewLogger returns a logger writing to w at level ("debug", "info",
// "warn" or "error") in format: "text" (logfmt-like key=value lines, the
// default when empty) or "json" (one JSON object a line, with the same
// keys). A bad level or format is a usage error.
func NewLogger(w io.Writer, format, level string) (*slog.Logger, error) {
	var l slog.Level
	if err := l.UnmarshalText([]byte(level)); err != nil {
		return nil, Usagef("log level %q: want debug, info, warn or error", level)
	}
	opts := &slog.HandlerOptions{Level: l}
	switch format {
	case "", "text":
		return slog.New(slog.NewTextHandler(w, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(w, opts)), nil
	}
	return nil, Usagef("log format %q: want text or json", format)
}
