package keystore

import (
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
)

// PKCS11 holds the attributes of a pkcs11: keystore URI (RFC 7512), such as
//
//	pkcs11:token=mqtls;object=device?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-source=file:/etc/mqtls/pin
//
// The path attributes select one token (every one given must match) and,
// with object, restrict the store to the key of that label. The query
// attributes name the PKCS#11 module to load and where the user PIN comes
// from. The PIN itself never appears in a URI: pin-value is refused.
type PKCS11 struct {
	Token        string // token: the token label
	Manufacturer string // manufacturer: the token's manufacturer ID
	Model        string // model: the token's model
	Serial       string // serial: the token's serial number
	SlotID       string // slot-id: the slot number, decimal
	// Object (object) restricts the store to the one key of that label,
	// which must be a valid key name; "" means every key on the token.
	Object string
	// ModulePath (module-path) is the absolute path of the PKCS#11 module
	// (a shared library) to load.
	ModulePath string
	// PINSource (pin-source) says where the user PIN is read:
	// "file:PATH" (a file of mode 0600 or stricter holding the PIN, one
	// trailing newline ignored) or "env:NAME" (the environment variable
	// NAME).
	PINSource string
}

// pkcs11Attrs lists the accepted attributes in the order String prints them.
var (
	pkcs11PathAttrs  = []string{"token", "manufacturer", "model", "serial", "slot-id", "object"}
	pkcs11QueryAttrs = []string{"module-path", "pin-source"}
)

func (p *PKCS11) field(name string) *string {
	switch name {
	case "token":
		return &p.Token
	case "manufacturer":
		return &p.Manufacturer
	case "model":
		return &p.Model
	case "serial":
		return &p.Serial
	case "slot-id":
		return &p.SlotID
	case "object":
		return &p.Object
	case "module-path":
		return &p.ModulePath
	case "pin-source":
		return &p.PINSource
	}
	return nil
}

// parsePKCS11 parses what follows "pkcs11:". Its errors never quote a
// pin-value.
func parsePKCS11(s string) (PKCS11, error) {
	var p PKCS11
	path, query, _ := strings.Cut(s, "?")
	parts := func(s, sep string, names []string) error {
		if s == "" {
			return nil
		}
		for attr := range strings.SplitSeq(s, sep) {
			name, raw, ok := strings.Cut(attr, "=")
			if name == "pin-value" {
				return errors.New("pin-value is refused: a PIN in a URI ends up in shell history, process lists and logs; " +
					"put it in a file of mode 0600 (pin-source=file:PATH) or an environment variable (pin-source=env:NAME)")
			}
			if !ok {
				return fmt.Errorf("attribute %q has no value", name)
			}
			f := p.field(name)
			if f == nil || !slices.Contains(names, name) {
				return fmt.Errorf("unknown %s attribute %q (accepted: %s)", partName(sep), name, strings.Join(names, ", "))
			}
			if *f != "" {
				return fmt.Errorf("attribute %s given twice", name)
			}
			v, err := pctDecode(raw)
			if err != nil {
				return fmt.Errorf("attribute %s: %w", name, err)
			}
			if v == "" {
				return fmt.Errorf("attribute %s is empty", name)
			}
			if strings.IndexByte(v, 0) >= 0 {
				return fmt.Errorf("attribute %s holds a NUL byte", name)
			}
			*f = v
		}
		return nil
	}
	if err := parts(path, ";", pkcs11PathAttrs); err != nil {
		return PKCS11{}, err
	}
	if err := parts(query, "&", pkcs11QueryAttrs); err != nil {
		return PKCS11{}, err
	}
	if err := p.validate(); err != nil {
		return PKCS11{}, err
	}
	return p, nil
}

func partName(sep string) string {
	if sep == ";" {
		return "path"
	}
	return "query"
}

// validate checks the attributes the backend needs and normalises slot-id.
func (p *PKCS11) validate() error {
	if p.Token == "" && p.Serial == "" && p.SlotID == "" {
		return errors.New("pkcs11: needs a token to select (token=LABEL, serial=NUMBER or slot-id=N)")
	}
	if p.SlotID != "" {
		n, err := strconv.ParseUint(p.SlotID, 10, 32)
		if err != nil {
			return fmt.Errorf("slot-id %q is not a decimal slot number", p.SlotID)
		}
		p.SlotID = strconv.FormatUint(n, 10)
	}
	if p.Object != "" {
		if err := CheckName(p.Object); err != nil {
			return fmt.Errorf("object: %w", err)
		}
	}
	if p.ModulePath == "" {
		return errors.New("pkcs11: needs module-path=/PATH/TO/MODULE.so (e.g. /usr/lib/softhsm/libsofthsm2.so)")
	}
	if !filepath.IsAbs(p.ModulePath) {
		return fmt.Errorf("module-path %q is not an absolute path", p.ModulePath)
	}
	scheme, arg, _ := strings.Cut(p.PINSource, ":")
	switch {
	case p.PINSource == "":
		return errors.New("pkcs11: needs pin-source=file:PATH or pin-source=env:NAME")
	case scheme == "file" && arg != "":
	case scheme == "env" && validEnvName(arg):
	default:
		return fmt.Errorf("pin-source %q: want file:PATH or env:NAME", p.PINSource)
	}
	return nil
}

func validEnvName(s string) bool {
	if s == "" || s[0] >= '0' && s[0] <= '9' {
		return false
	}
	for _, c := range []byte(s) {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == '_') {
			return false
		}
	}
	return true
}

// String returns the URI in the canonical form ParseURI accepts.
func (p PKCS11) String() string {
	var b strings.Builder
	b.WriteString(KindPKCS11 + ":")
	sep := ""
	for _, name := range pkcs11PathAttrs {
		if v := *p.field(name); v != "" {
			b.WriteString(sep + name + "=" + pctEncode(v, ":"))
			sep = ";"
		}
	}
	sep = "?"
	for _, name := range pkcs11QueryAttrs {
		if v := *p.field(name); v != "" {
			b.WriteString(sep + name + "=" + pctEncode(v, ":/"))
			sep = "&"
		}
	}
	return b.String()
}

// pctEncode escapes every byte but unreserved characters and extra.
func pctEncode(s, extra string) string {
	const hex = "0123456789ABCDEF"
	var b strings.Builder
	for _, c := range []byte(s) {
		if c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || strings.IndexByte("-._~"+extra, c) >= 0 {
			b.WriteByte(c)
			continue
		}
		b.WriteByte('%')
		b.WriteByte(hex[c>>4])
		b.WriteByte(hex[c&15])
	}
	return b.String()
}

func pctDecode(s string) (string, error) {
	if !strings.Contains(s, "%") {
		return s, nil
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] != '%' {
			b.WriteByte(s[i])
			continue
		}
		if i+2 >= len(s) {
			return "", errors.New("truncated %-escape")
		}
		n, err := strconv.ParseUint(s[i+1:i+3], 16, 8)
		if err != nil {
			return "", fmt.Errorf("bad %%-escape %q", s[i:i+3])
		}
		b.WriteByte(byte(n))
		i += 2
	}
	return b.String(), nil
}

// redactPIN hides the value of any pin-value attribute in s, so errors
// about a refused URI do not repeat the PIN.
func redactPIN(s string) string {
	const key = "pin-value="
	var b strings.Builder
	for {
		i := strings.Index(s, key)
		if i < 0 {
			b.WriteString(s)
			return b.String()
		}
		b.WriteString(s[:i+len(key)] + "REDACTED")
		s = s[i+len(key):]
		if j := strings.IndexAny(s, "&;?"); j >= 0 {
			s = s[j:]
		} else {
			s = ""
		}
	}
}
