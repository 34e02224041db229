// Package layout holds no code: its test keeps the module's import graph
// one-way (see the package table in the README). Run it with
// go test ./internal/testing/layout.
package layout
