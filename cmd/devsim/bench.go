package main

import (
	"context"
	"io"
	"net"
	"os"
	"os/exec"
	"time"

	"github.com/mqtls/mqtls/cmd/internal/cli"
	"github.com/mqtls/mqtls/sim/bench"
)

func cmdBench(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := cli.NewFlags("devsim bench", stderr)
	brokerBin := fs.String("broker-bin", "", "the cmd/broker binary to run (go build -o bin/broker ./cmd/broker)")
	mosquitto := fs.String("mosquitto", "", "mosquitto binary (default: from PATH or /usr/sbin/mosquitto)")
	devsim := fs.String("devsim-bin", "", "devsim binary run as the bare crypto/tls reference server (default: this program)")
	devices := fs.Int("devices", 2000, "sessions held, each publishing QoS 1 once a second")
	duration := fs.Duration("duration", 10*time.Second, "length of the once-a-second traffic and of the flood")
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
	if *devsim == "" {
		self, err := os.Executable()
		if err != nil {
			return err
		}
		*devsim = self
	}
	var log io.Writer
	if *verbose {
		log = stderr
	}
	return bench.Compare(ctx, bench.Config{BrokerBin: *brokerBin, Mosquitto: *mosquitto, RawTLS: []string{*devsim, "bench-raw-tls"}, Devices: *devices, Duration: *duration, Out: stdout, Log: log})
}

// cmdBenchRawTLS (hidden, DATA ADDR) is the reference server devsim bench
// starts in its own process: a bare crypto/tls server with the broker's
// certificates.
func cmdBenchRawTLS(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	if len(args) != 2 {
		return cli.Usagef("usage: devsim bench-raw-tls DATA ADDR")
	}
	ln, err := net.Listen("tcp", args[1])
	if err != nil {
		return err
	}
	return bench.ServeRawTLS(ctx, args[0], ln)
}
