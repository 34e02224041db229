package main

import (
	"context"
	"fmt"
	"io"
	"strings"

	"github.com/mqtls/mqtls/cmd/internal/cli"
)

// cmdGateway: broker gateway — the devices a gateway speaks for. With
// --children it replaces them (live sessions follow within a poll), else
// it prints them.
func cmdGateway(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("broker gateway", stderr)
	data := dataFlag(fs)
	id := fs.String("device", "", "the gateway's device ID")
	children := fs.String("children", "", "comma-separated device IDs the gateway speaks for (replaces the list)")
	clear := fs.Bool("clear", false, "remove every child")
	regFlags := addRegistryFlags(fs)
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if err := needData(*data); err != nil {
		return err
	}
	if *id == "" {
		return cli.Usagef("--device ID is required")
	}
	if *clear && *children != "" {
		return cli.Usagef("--clear and --children exclude each other")
	}
	reg, err := regFlags.open(ctx, *data)
	if err != nil {
		return err
	}
	defer reg.Close()
	if *children != "" || *clear {
		var list []string
		for _, c := range strings.Split(*children, ",") {
			if c = strings.TrimSpace(c); c != "" {
				list = append(list, c)
			}
		}
		if err := reg.SetChildren(ctx, *id, list); err != nil {
			return err
		}
	}
	list, err := reg.Children(ctx, *id)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "%s: %d children\n", *id, len(list))
	for _, c := range list {
		fmt.Fprintln(stdout, c)
	}
	return nil
}
