// Package broker is the MQTT backend: an embedded Mochi MQTT server behind a
// mutual-TLS listener, with one authorization hook that maps the verified
// client certificate to topic permissions (package broker/policy).
//
// Imports: broker/policy, deviceid, provisioning/registry and
// provisioning/ca (key rules), Mochi; never the provisioning root package
// (EST client, pkcs7) nor device.
//
// # Security
//
// Deny by default. A client is admitted only over TLS with a client
// certificate chain that Go verified against the pinned root; the leaf must
// not be a CA, must carry EKU clientAuth, a CN that is a device ID (package deviceid: [A-Za-z0-9._-]{1,64}) equal
// to the MQTT client ID, and must not be revoked (registry or CRL); its Will
// topic must be one it may publish to. Refusals get CONNACK "not authorized"
// (v5 0x87, v3 0x05) and one audit line (CN, serial, remote, reason).
// Publishes, subscriptions (filter containment) and every delivery are
// checked against the permissions compiled at CONNECT. Revocations close
// live sessions within a second of reaching the registry or the CRL file; a
// session ends when its certificate expires. The TLS handshake and CONNECT
// must complete within a deadline; the listener survives accept errors such
// as EMFILE.
//
// # Flow control
//
// Mochi drops a delivery when a subscriber's outbound queue is full, QoS 1
// included. This broker instead holds back a QoS 1/2 publisher (its read
// loop, hence TCP) while any subscriber it would deliver to at QoS >= 1 has
// no room, so memory stays bounded (MaxWritesPending per client) and no
// QoS 1 message is lost. A subscriber that stays full for StallTimeout is
// disconnected; with a persistent session its messages wait in its inflight
// store for the reconnect.
//
// # Concurrency
//
// A Broker is safe for concurrent use. SetPolicy may be called at any time.
package broker
