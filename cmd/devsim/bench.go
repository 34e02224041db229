package main

import (
	"context"
	"io"
	"os/exec"
	"time"

	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/sim/bench"
)

func cmdBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("devsim bench", stderr)
	brokerBin := fs.String("broker-bin", "", "the cmd/broker binary to run (go build -o bin/broker ./cmd/broker)")
	mosquitto := fs.String("mosquitto", "", "mosquitto binary (default: from PATH or /usr/sbin/mosquitto)")
	devices := fs.Int("devices", 2000, "idle sessions for the connect and memory figures")
	duration := fs.Duration("duration", 10*time.Second, "length of the publish flood")
	verbose := fs.Bool("v", false, "show the brokers' output")
	if err := cli.Parse(fs, args); err != nil {
		return err
	}
	if *brokerBin == "" {
		return cli.Usagef("--broker-bin is required")
	}
	if *mosquitto == "" {
		p, err := exec.LookPath("mosquitto")
		if err != nil {
			p = "/usr/sbin/mosquitto"
		}
		*mosquitto = p
	}
	var log io.Writer
	if *verbose {
		log = stderr
	}
	return bench.Compare(ctx, bench.Config{BrokerBin: *brokerBin, Mosquitto: *mosquitto, Devices: *devices, Duration: *duration, Out: stdout, Log: log})
}
