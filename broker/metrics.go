package broker

import (
	"strings"

	"github.com/prometheus/client_golang/prometheus"
)

type metrics struct {
	connections  prometheus.Gauge
	accepted     prometheus.Counter
	refused      *prometheus.CounterVec
	kicked       *prometheus.CounterVec
	aclDenied    *prometheus.CounterVec
	handshake    prometheus.Histogram
	msgIn        prometheus.Counter
	msgOut       prometheus.Counter
	dropped      *prometheus.CounterVec
	backpressure prometheus.Counter
	clones       prometheus.Counter
	acceptErrors prometheus.Counter
	registryUp   prometheus.Gauge
}

func newMetrics() *metrics {
	return &metrics{
		connections: prometheus.NewGauge(prometheus.GaugeOpts{Name: "mqtls_connections", Help: "Authenticated MQTT sessions."}),
		accepted:    prometheus.NewCounter(prometheus.CounterOpts{Name: "mqtls_connects_accepted_total", Help: "CONNECTs admitted."}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mqtls_connects_refused_total",
			Help: "Connections refused at the handshake or CONNECT, by reason."}, []string{"reason"}),
		kicked: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mqtls_sessions_closed_total",
			Help: "Live sessions closed by the broker, by reason (revoked, expired, stalled)."}, []string{"reason"}),
		aclDenied: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mqtls_acl_denied_total",
			Help: "ACL denials by action (publish, subscribe, receive)."}, []string{"action"}),
		handshake: prometheus.NewHistogram(prometheus.HistogramOpts{Name: "mqtls_tls_handshake_seconds",
			Help: "Successful TLS handshake duration.", Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14)}),
		msgIn:  prometheus.NewCounter(prometheus.CounterOpts{Name: "mqtls_messages_in_total", Help: "PUBLISH packets accepted from clients."}),
		msgOut: prometheus.NewCounter(prometheus.CounterOpts{Name: "mqtls_messages_out_total", Help: "PUBLISH packets written to clients."}),
		dropped: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "mqtls_deliveries_dropped_total",
			Help: "Deliveries dropped, by reason: queue_full_qos0/1/2 (a live subscriber's outbound queue was full; QoS>0 should stay 0), offline_queue_full (a disconnected persistent session reached MaxQueuedMessages)."}, []string{"reason"}),
		backpressure: prometheus.NewCounter(prometheus.CounterOpts{Name: "mqtls_publisher_waits_total",
			Help: "QoS>0 publishes held back until a subscriber had room."}),
		clones: prometheus.NewCounter(prometheus.CounterOpts{Name: "mqtls_certificate_clones_total",
			Help: "CONNECTs with a certificate already in use by a live session."}),
		acceptErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "mqtls_accept_errors_total",
			Help: "Listener accept errors (e.g. EMFILE) survived."}),
		registryUp: prometheus.NewGauge(prometheus.GaugeOpts{Name: "mqtls_registry_up",
			Help: "1 when the last revocation poll of the registry succeeded, 0 while it fails (new connections refused unless configured otherwise)."}),
	}
}

func (m *metrics) register(r prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{m.connections, m.accepted, m.refused, m.kicked, m.aclDenied,
		m.handshake, m.msgIn, m.msgOut, m.dropped, m.backpressure, m.clones, m.acceptErrors, m.registryUp} {
		if err := r.Register(c); err != nil {
			return err
		}
	}
	return nil
}

func reasonLabel(reason string) string {
	for _, l := range []string{"revoked", "expired", "stalled"} {
		if strings.Contains(reason, l) {
			return l
		}
	}
	return "other"
}
