package keystore_test

import (
	"errors"
	"strings"
	"testing"

	"github.com/mqtls/mqtls/keystore"
)

const softhsm = "/usr/lib/softhsm/libsofthsm2.so"

// Refused pkcs11: URIs, each with the reason the error must name. A PIN
// written into the URI is refused and never repeated in the error.
func TestParseURIPKCS11Refused(t *testing.T) {
	q := "?module-path=" + softhsm + "&pin-source=file:/etc/pin"
	for _, tc := range []struct{ in, why string }{
		{"pkcs11", "needs attributes"},
		{"pkcs11:", "needs a token"},
		{"pkcs11:object=device" + q, "needs a token"},
		{"pkcs11:token=mqtls?pin-source=file:/etc/pin", "needs module-path"},
		{"pkcs11:token=mqtls?module-path=libsofthsm2.so&pin-source=file:/etc/pin", "not an absolute path"},
		{"pkcs11:token=mqtls?module-path=" + softhsm, "needs pin-source"},
		{"pkcs11:token=mqtls?module-path=" + softhsm + "&pin-source=/etc/pin", "want file:PATH or env:NAME"},
		{"pkcs11:token=mqtls?module-path=" + softhsm + "&pin-source=env:1BAD", "want file:PATH or env:NAME"},
		{"pkcs11:token=mqtls?module-path=" + softhsm + "&pin-source=file:", "want file:PATH or env:NAME"},
		{"pkcs11:token=mqtls;id=%01" + q, `unknown path attribute "id"`},
		{"pkcs11:token=mqtls" + q + "&module-name=softhsm2", `unknown query attribute "module-name"`},
		{"pkcs11:token=mqtls;module-path=" + softhsm + "?pin-source=file:/etc/pin", `unknown path attribute "module-path"`},
		{"pkcs11:token=a;token=b" + q, "given twice"},
		{"pkcs11:token=" + q, "is empty"},
		{"pkcs11:token" + q, "has no value"},
		{"pkcs11:token=%zz" + q, "bad %-escape"},
		{"pkcs11:token=%4" + q, "truncated"},
		{"pkcs11:token=a%00b" + q, "NUL"},
		{"pkcs11:slot-id=x" + q, "not a decimal slot number"},
		{"pkcs11:token=mqtls;object=../x" + q, "invalid key name"},
		{"pkcs11:token=mqtls" + q + "&pin-value=s3cr3t-1234", "pin-value is refused"},
		{"pkcs11:token=mqtls;pin-value=s3cr3t-1234" + q, "pin-value is refused"},
	} {
		t.Run(tc.in, func(t *testing.T) {
			_, err := keystore.ParseURI(tc.in)
			if !errors.Is(err, keystore.ErrBadURI) {
				t.Fatalf("ParseURI = %v, want ErrBadURI", err)
			}
			if !strings.Contains(err.Error(), tc.why) {
				t.Errorf("error does not say %q: %v", tc.why, err)
			}
			if strings.Contains(err.Error(), "s3cr3t") {
				t.Errorf("error repeats the PIN: %v", err)
			}
		})
	}
}

func TestParseURIPKCS11(t *testing.T) {
	good := map[string]keystore.PKCS11{
		"pkcs11:token=mqtls;object=device?module-path=" + softhsm + "&pin-source=file:PIN": {
			Token: "mqtls", Object: "device", ModulePath: softhsm, PINSource: "file:PIN"},
		"pkcs11:serial=0123abcd;token=My%20Token?pin-source=env:MQTLS_PIN&module-path=/opt/x%20y/p11.so": {
			Token: "My Token", Serial: "0123abcd", ModulePath: "/opt/x y/p11.so", PINSource: "env:MQTLS_PIN"},
		"pkcs11:slot-id=007;manufacturer=SoftHSM%20project;model=SoftHSM%20v2?module-path=" + softhsm + "&pin-source=file:/run/secrets/p%3Bin": {
			SlotID: "7", Manufacturer: "SoftHSM project", Model: "SoftHSM v2", ModulePath: softhsm, PINSource: "file:/run/secrets/p;in"},
	}
	for in, want := range good {
		got, err := keystore.ParseURI(in)
		if err != nil {
			t.Errorf("ParseURI(%q): %v", in, err)
			continue
		}
		if got != (keystore.URI{Kind: keystore.KindPKCS11, PKCS11: want}) {
			t.Errorf("ParseURI(%q) = %+v, want %+v", in, got.PKCS11, want)
		}
		back, err := keystore.ParseURI(got.String())
		if err != nil || back != got {
			t.Errorf("String() of %q = %q does not round-trip: %+v, %v", in, got.String(), back, err)
		}
	}
	u, _ := keystore.ParseURI("pkcs11:object=device;token=mqtls?pin-source=file:PIN&module-path=" + softhsm)
	if want := "pkcs11:token=mqtls;object=device?module-path=" + softhsm + "&pin-source=file:PIN"; u.String() != want {
		t.Errorf("String() = %q, want canonical %q", u.String(), want)
	}
}
