package tpm

import (
	"crypto"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-tpm/tpm2"
	"github.com/google/go-tpm/tpm2/transport"
	"github.com/google/go-tpm/tpm2/transport/tcp"

	"github.com/mqtls/mqtls/hardware/tpm/swtpmtest"
	"github.com/mqtls/mqtls/keystore"
)

// TPM response codes a user can act on come back as sentinels with the fix:
// a wrong owner password (TPM_RC_BAD_AUTH) and dictionary-attack lockout
// (TPM_RC_LOCKOUT), produced on a real swtpm.
func TestAuthAndLockoutErrors(t *testing.T) {
	sw := swtpmtest.Start(t)
	dir := filepath.Join(t.TempDir(), "keys")
	host, port, _ := net.SplitHostPort(sw.Addr)
	p, _ := strconv.Atoi(port)
	raw, err := tcp.Open(tcp.Config{CommandAddress: sw.Addr, PlatformAddress: net.JoinHostPort(host, strconv.Itoa(p+1))})
	if err != nil {
		t.Fatal(err)
	}
	// One failed authorization puts the TPM into lockout for 1000 s.
	setDAParameters(t, raw, 1, 1000, 1000)
	srk, err := tpm2.CreatePrimary{
		PrimaryHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		InPublic:      tpm2.New2B(srkTemplate),
	}.Execute(raw)
	if err != nil {
		t.Fatal(err)
	}
	parent := tpm2.AuthHandle{Handle: srk.ObjectHandle, Name: srk.Name, Auth: tpm2.PasswordAuth(nil)}
	// victim: a key made by another tool without noDA (openssl's tpm2
	// provider does that for keys with a password).
	daTmpl := keyTemplate(keystore.ECDSAP256)
	daTmpl.ObjectAttributes.NoDA = false
	victim, err := tpm2.Create{ParentHandle: parent, InPublic: tpm2.New2B(daTmpl)}.Execute(raw)
	if err != nil {
		t.Fatal(err)
	}
	k, err := newKey(victim.OutPublic, victim.OutPrivate)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "victim"+KeyFileExt), k.encode(), 0o600); err != nil {
		t.Fatal(err)
	}
	// bait: a DA-protected key with a password, used with the wrong one.
	bait, err := tpm2.Create{
		ParentHandle: parent,
		InPublic:     tpm2.New2B(daTmpl),
		InSensitive:  tpm2.TPM2BSensitiveCreate{Sensitive: &tpm2.TPMSSensitiveCreate{UserAuth: tpm2.TPM2BAuth{Buffer: []byte("pw")}}},
	}.Execute(raw)
	if err != nil {
		t.Fatal(err)
	}
	loaded, err := tpm2.Load{ParentHandle: parent, InPrivate: bait.OutPrivate, InPublic: bait.OutPublic}.Execute(raw)
	if err != nil {
		t.Fatal(err)
	}
	d := sha256.Sum256(nil)
	err = retry(func() error {
		_, err := tpm2.Sign{
			KeyHandle:  tpm2.AuthHandle{Handle: loaded.ObjectHandle, Name: loaded.Name, Auth: tpm2.PasswordAuth([]byte("wrong"))},
			Digest:     tpm2.TPM2BDigest{Buffer: d[:]},
			InScheme:   tpm2.TPMTSigScheme{Scheme: tpm2.TPMAlgECDSA, Details: tpm2.NewTPMUSigScheme(tpm2.TPMAlgECDSA, &tpm2.TPMSSchemeHash{HashAlg: tpm2.TPMAlgSHA256})},
			Validation: tpm2.TPMTTKHashCheck{Tag: tpm2.TPMSTHashCheck, Hierarchy: tpm2.TPMRHNull},
		}.Execute(raw)
		return err
	})
	if !errors.Is(err, tpm2.TPMRCAuthFail) {
		t.Fatalf("sign with wrong password = %v, want TPM_RC_AUTH_FAIL", err)
	}
	for _, h := range []tpm2.TPMHandle{loaded.ObjectHandle, srk.ObjectHandle} {
		if _, err := (tpm2.FlushContext{FlushHandle: h}).Execute(raw); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := (tpm2.HierarchyChangeAuth{
		AuthHandle: tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)},
		NewAuth:    tpm2.TPM2BAuth{Buffer: []byte("owner-secret")},
	}).Execute(raw); err != nil {
		t.Fatal(err)
	}
	raw.Close()

	_, err = OpenSWTPM(t.Context(), sw.Addr, dir)
	if !errors.Is(err, ErrAuth) || !errors.Is(err, tpm2.TPMRCBadAuth) {
		t.Fatalf("open without the owner password = %v, want ErrAuth wrapping TPM_RC_BAD_AUTH", err)
	}
	t.Logf("bad auth: %v", err)
	s, err := OpenSWTPM(t.Context(), sw.Addr, dir, WithOwnerAuth([]byte("owner-secret")))
	if err != nil {
		t.Fatalf("open with the owner password: %v", err)
	}
	defer s.Close()
	signer, err := s.Signer(t.Context(), "victim")
	if err != nil {
		t.Fatal(err)
	}
	_, err = signer.Sign(nil, d[:], crypto.SHA256)
	if !errors.Is(err, ErrLockout) || !errors.Is(err, tpm2.TPMRCLockout) {
		t.Fatalf("sign in lockout = %v, want ErrLockout wrapping TPM_RC_LOCKOUT", err)
	}
	t.Logf("lockout: %v", err)
	// Our own keys are noDA: lockout does not take the device offline.
	own, err := s.Generate(t.Context(), "own", "")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := own.Sign(nil, d[:], crypto.SHA256); err != nil {
		t.Fatalf("noDA key in lockout: %v", err)
	}
}

// setDAParameters sends TPM2_DictionaryAttackParameters (not in go-tpm's
// tpm2 package) with an empty lockout password.
func setDAParameters(t *testing.T, tpm transport.TPM, maxTries, recovery, lockoutRecovery uint32) {
	t.Helper()
	cmd := binary.BigEndian.AppendUint16(nil, uint16(tpm2.TPMSTSessions))
	cmd = binary.BigEndian.AppendUint32(cmd, 0) // size, patched below
	cmd = binary.BigEndian.AppendUint32(cmd, 0x13A)
	cmd = binary.BigEndian.AppendUint32(cmd, uint32(tpm2.TPMRHLockout))
	cmd = binary.BigEndian.AppendUint32(cmd, 9) // password session: handle, empty nonce, attrs, empty hmac
	cmd = binary.BigEndian.AppendUint32(cmd, uint32(tpm2.TPMRSPW))
	cmd = append(cmd, 0, 0, 0, 0, 0)
	for _, v := range []uint32{maxTries, recovery, lockoutRecovery} {
		cmd = binary.BigEndian.AppendUint32(cmd, v)
	}
	binary.BigEndian.PutUint32(cmd[2:], uint32(len(cmd)))
	rsp, err := tpm.Send(cmd)
	if err != nil {
		t.Fatal(err)
	}
	if rc := binary.BigEndian.Uint32(rsp[6:10]); rc != 0 {
		t.Fatalf("DictionaryAttackParameters: %v", tpm2.TPMRC(rc))
	}
}

// A persistent handle that holds something else than the SRK is refused.
func TestPersistentHandleTaken(t *testing.T) {
	sw := swtpmtest.Start(t)
	host, port, _ := net.SplitHostPort(sw.Addr)
	p, _ := strconv.Atoi(port)
	raw, err := tcp.Open(tcp.Config{CommandAddress: sw.Addr, PlatformAddress: net.JoinHostPort(host, strconv.Itoa(p+1))})
	if err != nil {
		t.Fatal(err)
	}
	owner := tpm2.AuthHandle{Handle: tpm2.TPMRHOwner, Auth: tpm2.PasswordAuth(nil)}
	key, err := tpm2.CreatePrimary{PrimaryHandle: owner, InPublic: tpm2.New2B(keyTemplate(keystore.ECDSAP256))}.Execute(raw)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := (tpm2.EvictControl{Auth: owner, ObjectHandle: tpm2.NamedHandle{Handle: key.ObjectHandle, Name: key.Name}, PersistentHandle: 0x81000003}).Execute(raw); err != nil {
		t.Fatal(err)
	}
	tpm2.FlushContext{FlushHandle: key.ObjectHandle}.Execute(raw)
	raw.Close()
	_, err = OpenSWTPM(t.Context(), sw.Addr, filepath.Join(t.TempDir(), "k"), WithPersistentSRK(0x81000003))
	if err == nil || !strings.Contains(err.Error(), "holds another object than the SRK") {
		t.Fatalf("SRK at an occupied handle = %v", err)
	}
}
