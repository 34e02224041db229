// Package device is the SDK devices link: it enrolls and renews the
// device's identity (key in a [keystore.Store], certificate over EST) and
// keeps it in an identity directory.
//
// # Identity directory
//
//	DIR/identity.json  device ID, keystore URI, EST URL (no secrets)
//	DIR/device.crt     leaf + issuing CA (PEM)
//	DIR/ca.crt         the pinned root (PEM)
//	DIR/device.key     the key, with the file keystore (PKCS#8, 0600)
//	DIR/device.tpmkey  the key blob, with a TPM keystore
//
// # Security
//
// The key is created in the keystore and never leaves it. The EST server
// is authenticated against the pinned root only, and every chain received
// is verified before it is stored. Files are replaced atomically (temp
// file, fsync, rename) with device.crt as the commit point, so a crash or
// a refused request leaves the previous identity usable. The directory is
// 0700; the enrollment token is never written.
package device
