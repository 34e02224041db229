// Command device is a minimal device program: it loads its identity
// (key in a file keystore or a TPM), connects to the broker and publishes
// a reading every --every. It is what the README's footprint figures
// (static binary size, RSS) are measured on.
package main

import (
	"context"
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/mqtls/mqtls/device"
	"github.com/mqtls/mqtls/hardware/tpm"
	"github.com/mqtls/mqtls/keystore"
)

func main() {
	broker := flag.String("broker", "mqtts://127.0.0.1:8883", "broker URL")
	dir := flag.String("identity", "identity", "identity directory")
	useTPM := flag.Bool("tpm", false, "the key is in /dev/tpmrm0")
	every := flag.Duration("every", 10*time.Second, "publish interval")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *broker, *dir, *useTPM, *every); err != nil {
		log.Fatal(err)
	}
}

func run(ctx context.Context, broker, dir string, useTPM bool, every time.Duration) error {
	var store keystore.Store
	if useTPM {
		s, err := tpm.Open(ctx, keystore.DefaultTPMDevice, dir)
		if err != nil {
			return err
		}
		defer s.Close()
		store = s
	} else {
		s, err := keystore.NewFile(dir)
		if err != nil {
			return err
		}
		defer s.Close()
		store = s
	}
	id, err := device.Load(ctx, dir, store)
	if err != nil {
		return err
	}
	c, err := device.New(device.Config{Broker: broker, Identity: id, Store: store})
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.Connect(ctx); err != nil {
		return err
	}
	topic := "devices/" + id.Leaf().Subject.CommonName + "/telemetry"
	t := time.NewTicker(every)
	defer t.Stop()
	for i := 0; ; i++ {
		if err := c.Publish(ctx, topic, fmt.Appendf(nil, `{"seq":%d}`, i), 1, false); err != nil {
			log.Print(err)
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}
