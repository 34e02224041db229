// Package provisioning is the device side of factory enrollment: it builds
// a PKCS#10 certificate request from a keystore signer, enrolls and
// re-enrolls over EST (RFC 7030, with the RFC 8951 clarifications), checks
// that the answer chains to the pinned root and certifies the signer's key,
// and keeps the resulting identity directory crash-safe.
//
// The server side lives in the subpackages: ca (the PKI and the issuance
// policy), registry (devices, tokens, certificates, audit) and server (the
// EST HTTP handlers). A device links only this package. Device IDs are
// checked by package deviceid, which the broker shares without linking the
// EST client.
//
// # Security
//
// The private key never leaves its keystore: requests are signed through a
// [crypto.Signer]. The EST server is authenticated against the pinned root
// only (no system roots). Enrollment tokens are never written to disk.
package provisioning
