module github.com/mqtls/mqtls

go 1.26

require (
	github.com/google/go-cmp v0.7.0 // indirect
	github.com/google/go-tpm v0.9.8 // indirect
	github.com/google/go-tpm-tools v0.4.10 // indirect
	golang.org/x/sys v0.45.0 // indirect
)
