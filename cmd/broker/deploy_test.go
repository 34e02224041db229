package main

import (
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/mqtls/mqtls/broker/policy"
)

// The shipped examples stay valid.
func TestDeployExamples(t *testing.T) {
	cfg := defaultServeConfig()
	if err := loadServeConfig("../../deploy/broker.yaml", &cfg); err != nil {
		t.Fatal(err)
	}
	if cfg.Data != "/var/lib/mqtls" || cfg.Policy == "" || cfg.MaxWritesPending != 64 || cfg.AuditMaxRows != 1_000_000 || cfg.AuditMaxAge != 2160*time.Hour {
		t.Fatalf("deploy/broker.yaml read as %+v", cfg)
	}
	data, err := os.ReadFile("../../deploy/policy.yaml")
	if err != nil {
		t.Fatal(err)
	}
	shipped, err := policy.Parse(data)
	if err != nil {
		t.Fatal(err)
	}
	example, _ := policy.Parse([]byte(policy.Example))
	if fmt.Sprint(shipped) != fmt.Sprint(example) {
		t.Fatal("deploy/policy.yaml and policy.Example differ")
	}
	bad := defaultServeConfig()
	os.WriteFile(t.TempDir()+"/x.yaml", nil, 0o600)
	f := t.TempDir() + "/bad.yaml"
	os.WriteFile(f, []byte("mqtt_adr: x\n"), 0o600)
	if err := loadServeConfig(f, &bad); err == nil {
		t.Fatal("unknown config key accepted")
	}
}
