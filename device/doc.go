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
//
// # Delivery
//
// [Client] speaks MQTT 3.1.1 with the session kept. A QoS 1
// [Client.Publish] returns nil once the broker acknowledged the message or
// once it is in the offline queue; delivery is at least once. MQTT 3.1.1
// cannot refuse a publish: the broker closes the connection, which the
// client cannot tell from a network drop, so it never reports that as a
// refusal ([ErrNotAuthorized] comes only from CONNACK and SUBACK); the
// message is resent until the caller's context ends, then withdrawn with
// [ErrTimeout] and [ErrLostInFlight].
//
// # Concurrency
//
// A Client is safe for concurrent use. Its callbacks run on its own
// goroutines and must not block. Every goroutine it starts ends within a
// second of [Client.Close]; cancelling the context of [Client.Connect]
// ends that attempt at once.
package device
