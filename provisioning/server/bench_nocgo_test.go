//go:build !cgo

package server_test

import "testing"

// benchHardwareCA needs cgo (PKCS#11 modules are C libraries).
func benchHardwareCA(b *testing.B) {}
