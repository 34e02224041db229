// Package keystore defines where a device's private keys live and the only
// way they leave it: as a [crypto.Signer].
//
// A [Store] generates named keys (ECDSA P-256 by default; P-384, RSA-2048
// and RSA-3072 too), hands out signers for them, lists and deletes them.
// This package holds the interface, its sentinel errors, the keystore URI
// syntax shared by the commands ([ParseURI]) and two software backends:
// [FileStore] (PKCS#8 PEM files) and [MemoryStore] (keys that die with the
// process, for simulators). The TPM 2.0 backend lives in package
// github.com/mqtls/mqtls/hardware/tpm, the PKCS#11 backend (secure elements,
// smart cards, HSMs; pkcs11: URIs, [PKCS11]) in package
// github.com/mqtls/mqtls/hardware/pkcs11.
//
// Imports: the standard library and the module's internal atomicfile and
// keyfiles (the key-file directory and Generate checks it shares with the
// TPM backend); never a backend, provisioning or device.
//
// # Security
//
// No method exports key material. FileStore keeps keys in a directory of mode
// 0700, one file of mode 0600 per key, written to a temporary file, fsynced
// and linked into place so a crash never leaves a torn key and an existing
// key is never overwritten. A key file that group or others may read is
// refused with [ErrInsecurePermissions]. Key names are confined to
// [A-Za-z0-9._-] (1–64 characters, no leading dot) and resolved with
// [os.Root], so a name can never escape the directory. A key name is a
// file name, not a device ID (package deviceid): it keeps its own rule.
//
// # Concurrency
//
// Every Store in this module is safe for concurrent use, and so are the
// signers it returns. Signing may block (a TPM takes 25–200 ms per
// signature); [crypto.Signer.Sign] takes no context, so callers bound it
// themselves.
package keystore
