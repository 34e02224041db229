package keystore

import (
	"errors"
	"fmt"
	"net"
	"path/filepath"
	"strings"
)

// ErrBadURI reports a keystore URI that is not one of the accepted forms.
var ErrBadURI = errors.New("keystore: bad keystore URI")

// URIForms lists the accepted keystore URIs, for help texts and errors.
const URIForms = `file (keys in the identity directory), file:DIR, mem, tpm (= /dev/tpmrm0), tpm:/dev/PATH, swtpm:HOST:PORT, tpmsim:DIR, pkcs11:token=LABEL[;object=NAME]?module-path=/PATH/TO/MODULE.so&pin-source=file:PATH|env:NAME`

// URI kinds.
const (
	KindFile   = "file"
	KindMem    = "mem"
	KindTPM    = "tpm"
	KindSWTPM  = "swtpm"
	KindTPMSim = "tpmsim"
	KindPKCS11 = "pkcs11"
)

// DefaultTPMDevice is the TPM a bare "tpm" URI names: the kernel's resource
// manager, which lets several processes share the TPM.
const DefaultTPMDevice = "/dev/tpmrm0"

// URI says which backend holds a device's keys. The commands take it as
// --keystore and an identity directory records it; [ParseURI] is the one
// parser. Opening the backend is the caller's choice (backends are never
// imported by this package).
type URI struct {
	Kind string // one of KindFile, KindMem, KindTPM, KindSWTPM, KindTPMSim
	// Path is the key directory for file and tpmsim ("" for plain "file":
	// the identity directory) or the device path for tpm.
	Path string
	// Addr is the swtpm command port, HOST:PORT; its control port is PORT+1.
	Addr string
	// PKCS11 holds the attributes of a pkcs11: URI.
	PKCS11 PKCS11
}

// ParseURI parses a keystore URI. The error wraps [ErrBadURI] and lists the
// accepted forms.
func ParseURI(s string) (URI, error) {
	kind, rest, hasArg := strings.Cut(s, ":")
	bad := func(why string) (URI, error) {
		return URI{}, fmt.Errorf("%w %q: %s; accepted forms: %s", ErrBadURI, redactPIN(s), why, URIForms)
	}
	switch kind {
	case KindFile:
		if hasArg && rest == "" {
			return bad("file: needs a directory")
		}
		return URI{Kind: KindFile, Path: rest}, nil
	case KindMem:
		if hasArg {
			return bad("mem takes no argument")
		}
		return URI{Kind: KindMem}, nil
	case KindTPM:
		if !hasArg {
			return URI{Kind: KindTPM, Path: DefaultTPMDevice}, nil
		}
		if !strings.HasPrefix(rest, "/dev/") || filepath.Clean(rest) != rest {
			return bad("tpm: needs a device path under /dev/")
		}
		return URI{Kind: KindTPM, Path: rest}, nil
	case KindSWTPM:
		host, port, err := net.SplitHostPort(rest)
		if !hasArg || err != nil || host == "" || port == "" {
			return bad("swtpm: needs HOST:PORT")
		}
		return URI{Kind: KindSWTPM, Addr: rest}, nil
	case KindTPMSim:
		if rest == "" {
			return bad("tpmsim: needs a directory")
		}
		return URI{Kind: KindTPMSim, Path: rest}, nil
	case KindPKCS11:
		if !hasArg {
			return bad("pkcs11: needs attributes")
		}
		p, err := parsePKCS11(rest)
		if err != nil {
			return bad(err.Error())
		}
		return URI{Kind: KindPKCS11, PKCS11: p}, nil
	}
	return bad("unknown kind")
}

// String returns the URI in the form ParseURI accepts.
func (u URI) String() string {
	switch u.Kind {
	case KindPKCS11:
		return u.PKCS11.String()
	case KindMem:
		return KindMem
	case KindSWTPM:
		return KindSWTPM + ":" + u.Addr
	case KindTPM:
		if u.Path == DefaultTPMDevice {
			return KindTPM
		}
	}
	if u.Path == "" {
		return u.Kind
	}
	return u.Kind + ":" + u.Path
}
