package main

import (
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"

	"gopkg.in/yaml.v3"

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

// The cluster examples (deploy/cluster: not run here, no container
// runtime) hold keys serve knows, commented ones included, and the
// compose file names its three nodes, NATS and PostgreSQL.
func TestDeployClusterExamples(t *testing.T) {
	raw, err := os.ReadFile("../../deploy/cluster/node.yaml")
	if err != nil {
		t.Fatal(err)
	}
	uncommented := regexp.MustCompile(`(?m)^# ([a-z_]+:)`).ReplaceAllString(string(raw), "$1")
	for _, text := range []string{string(raw), uncommented} {
		f := filepath.Join(t.TempDir(), "node.yaml")
		os.WriteFile(f, []byte(text), 0o600)
		cfg := defaultServeConfig()
		if err := loadServeConfig(f, &cfg); err != nil {
			t.Fatal(err)
		}
		if cfg.NodeName != "n1" || cfg.ClusterListen == "" || len(cfg.ClusterPeers) != 2 {
			t.Fatalf("deploy/cluster/node.yaml read as %+v", cfg)
		}
	}
	var compose struct{ Services map[string]any }
	raw, err = os.ReadFile("../../deploy/cluster/docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(raw, &compose); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{"n1", "n2", "n3", "nats1", "nats2", "nats3", "postgres", "init"} {
		if compose.Services[s] == nil {
			t.Errorf("docker-compose.yml has no service %s", s)
		}
	}
}
