package keystore_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/sha256"
	"fmt"
	"log"
	"os"
	"path/filepath"

	"github.com/mqtls/mqtls/keystore"
)

// A key is created inside the store and used only through its signer.
func ExampleNewFile() {
	dir, _ := os.MkdirTemp("", "example")
	defer os.RemoveAll(dir)
	store, err := keystore.NewFile(filepath.Join(dir, "keys"))
	if err != nil {
		log.Fatal(err)
	}
	defer store.Close()
	ctx := context.Background()
	signer, err := store.Generate(ctx, "device", keystore.ECDSAP256)
	if err != nil {
		log.Fatal(err)
	}
	digest := sha256.Sum256([]byte("hello"))
	sig, err := signer.Sign(nil, digest[:], crypto.SHA256)
	if err != nil {
		log.Fatal(err)
	}
	alg, _ := keystore.AlgOf(signer.Public())
	fmt.Println(alg, ecdsa.VerifyASN1(signer.Public().(*ecdsa.PublicKey), digest[:], sig))
	_, err = store.Generate(ctx, "device", "")
	fmt.Println(err != nil)
	// Output:
	// ecdsa-p256 true
	// true
}

// The commands choose a backend with a keystore URI.
func ExampleParseURI() {
	for _, s := range []string{"file", "tpm", "swtpm:127.0.0.1:2321", "pkcs11"} {
		u, err := keystore.ParseURI(s)
		if err != nil {
			fmt.Println("error")
			continue
		}
		fmt.Printf("%s path=%q addr=%q\n", u.Kind, u.Path, u.Addr)
	}
	// Output:
	// file path="" addr=""
	// tpm path="/dev/tpmrm0" addr=""
	// swtpm path="" addr="127.0.0.1:2321"
	// error
}
