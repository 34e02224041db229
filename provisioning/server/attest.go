package server

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"mime"
	"net/http"
	"strings"
	"time"

	"crypto/x509"
	"github.com/mqtls/mqtls/deviceid"
	"github.com/mqtls/mqtls/provisioning"
	"github.com/mqtls/mqtls/provisioning/attest"
	"github.com/mqtls/mqtls/provisioning/registry"
)

// attestChallenge answers a challenge request: the device authenticates
// with its (unused) token and sends its EK certificate and AK.
func (s *Server) attestChallenge(w http.ResponseWriter, r *http.Request) {
	const event = "enroll_refused"
	id, token, ok := r.BasicAuth()
	if !ok {
		s.refuse(w, r, event, "", "", refusal{http.StatusUnauthorized, "no_credentials", "missing HTTP Basic credentials (device ID and enrollment token)", ""})
		return
	}
	host := remoteHost(r)
	if err := deviceid.Check(id); err != nil {
		s.tokenFailed(w, r, "", host, refusal{http.StatusUnauthorized, "bad_device_id", err.Error(), ""})
		return
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		s.refuse(w, r, event, id, "", refusal{http.StatusUnsupportedMediaType, "unsupported_media_type",
			fmt.Sprintf("Content-Type %q: send the challenge request as application/json", r.Header.Get("Content-Type")), ""})
		return
	}
	if s.cfg.Attestation == nil {
		s.refuse(w, r, event, id, "", unavailable)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, s.cfg.MaxBodyBytes))
	var tooBig *http.MaxBytesError
	if errors.As(err, &tooBig) {
		s.refuse(w, r, event, id, "", refusal{http.StatusRequestEntityTooLarge, "body_too_large", fmt.Sprintf("request body larger than %d bytes", s.cfg.MaxBodyBytes), ""})
		return
	}
	var req provisioning.AttestRequest
	if err == nil {
		err = json.Unmarshal(body, &req)
	}
	if err != nil {
		s.refuse(w, r, event, id, "", refusal{http.StatusBadRequest, "bad_request", "challenge request: " + err.Error(), ""})
		return
	}
	if _, err := s.cfg.Registry.CheckToken(r.Context(), id, token); err != nil {
		if label := tokenLabel(err); label != "" {
			s.tokenFailed(w, r, id, host, refusal{http.StatusUnauthorized, label, "token refused: " + err.Error(), ""})
			return
		}
		s.registryFailed(w, r, event, id, "", "check token", err)
		return
	}
	ch, err := s.cfg.Attestation.Challenge(r.Context(), id, attest.Binding(token), req.EKCertificate, req.AKPublic)
	if err != nil {
		s.refuse(w, r, event, id, "", attestRefusal(err))
		return
	}
	out, err := json.Marshal(provisioning.AttestChallenge{ID: ch.ID, Credential: ch.Credential, Secret: ch.Secret, Nonce: ch.Nonce, Expires: ch.Expires.UTC().Truncate(time.Second)})
	if err != nil {
		http.Error(w, "internal error", http.StatusInternalServerError)
		return
	}
	s.log.Info("attestation challenge", "cn", id, "remote", remoteAddr(r))
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	_, _ = w.Write(out) // a failed write is the client's problem
}

var unavailable = refusal{http.StatusForbidden, "attest_unavailable", "TPM key attestation is not configured on this server (broker serve --tpm-ca)", ""}

// verifyAttestation checks the evidence of an enrollment, if any, against
// the token's policy: it returns the attesting EK (zero: not attested).
func (s *Server) verifyAttestation(r *http.Request, id, token string, g registry.Grant, csr *x509.CertificateRequest) (registry.EK, *refusal) {
	policy := g.Attest
	if policy == registry.AttestDefault {
		policy = s.cfg.Attest
	}
	chID := r.Header.Get(provisioning.HeaderAttestChallenge)
	if chID == "" {
		if policy == registry.AttestRequired {
			return registry.EK{}, &refusal{http.StatusForbidden, "attestation_required",
				"this enrollment requires TPM key attestation: the key must be made in a TPM with an EK certificate and enrolled with attestation (devsim enroll --attest, device.WithAttestation)", ""}
		}
		return registry.EK{}, nil
	}
	if s.cfg.Attestation == nil {
		return registry.EK{}, &unavailable
	}
	ev := attest.Evidence{ChallengeID: chID}
	for _, h := range []struct {
		name string
		dst  *[]byte
	}{
		{provisioning.HeaderAttestSecret, &ev.Secret}, {provisioning.HeaderAttestKey, &ev.KeyPublic},
		{provisioning.HeaderAttestCertify, &ev.CertifyInfo}, {provisioning.HeaderAttestSignature, &ev.Signature},
	} {
		b, err := base64.StdEncoding.DecodeString(strings.TrimSpace(r.Header.Get(h.name)))
		if err != nil || len(b) == 0 {
			return registry.EK{}, &refusal{http.StatusBadRequest, "bad_evidence", fmt.Sprintf("attestation evidence: header %s missing or not base64", h.name), ""}
		}
		*h.dst = b
	}
	ek, err := s.cfg.Attestation.Verify(r.Context(), id, attest.Binding(token), ev, csr.PublicKey)
	if err != nil {
		f := attestRefusal(err)
		return registry.EK{}, &f
	}
	return registry.EK{SHA256: ek.SHA256, Issuer: ek.Issuer, Serial: ek.Serial}, nil
}

func attestRefusal(err error) refusal {
	var ae *attest.Error
	if !errors.As(err, &ae) {
		return refusal{http.StatusInternalServerError, "attest_error", "attestation failed", ""}
	}
	status := http.StatusForbidden
	if ae.Malformed {
		status = http.StatusBadRequest
	}
	return refusal{status, ae.Label, "attestation refused: " + ae.Reason, ""}
}
