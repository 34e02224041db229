// Package tpm is the TPM 2.0 backend of [keystore.Store]: keys are created
// inside the TPM as children of the storage root key (SRK) and never leave
// it; what is stored on disk is the TPM-wrapped key blob.
//
// A key NAME lives in DIR/NAME.tpmkey, a "TSS2 PRIVATE KEY" PEM file whose
// parent is the owner hierarchy (0x40000001) with the SRK built from the TCG
// H-2 ECC P-256 template as openssl's tpm2 provider builds it: the format that openssl's tpm2 provider and
// tpm2-tools load, so a key made here can be used by them too and the other
// way round.
//
// The TPM is reached through a [transport.TPM]: [Open] takes a device such as
// /dev/tpmrm0 (the kernel resource manager, the default), [OpenSWTPM] a swtpm
// process over TCP, and [New] any transport, such as the in-process simulator
// of package github.com/mqtls/mqtls/hardware/tpm/tpmsim.
//
// [Store.Attest] proves to an enrollment server that a key of the Store
// lives in this TPM (TPM key attestation): it reads the EK certificate from
// NV, creates an attestation key, activates the server's credential and
// has the attestation key certify the device key.
//
// # Security
//
// Key blobs are encrypted by the TPM under the SRK; they are useless without
// the TPM that made them. Files are written atomically with mode 0600 in a
// 0700 directory. Keys are created with empty authorization and noDA, like
// keys made by openssl's tpm2 provider: possession of the TPM and the blob is
// the authorization. ECDSA keys sign with the one hash their curve pairs with
// (P-256: SHA-256, P-384: SHA-384); RSA keys sign PKCS #1 v1.5 or PSS, and
// PSS signatures are verified before they are returned so a TPM that picks
// another salt length than the caller asked for is caught.
//
// # Concurrency
//
// A Store serialises every TPM command with one mutex (go-tpm transports are
// not safe for concurrent use); its signers share it. Each signature loads
// the key, signs and flushes it, so at most two transient objects (SRK and
// key) are loaded at any time, even without a resource manager. Sign blocks
// for as long as the TPM takes (25–200 ms on hardware).
package tpm
