package tokenwire_test

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/tokenwire/tokenwire/clients/go/tokenwire"
)

type issued struct{ cert, key string }

// pki writes a CA, a server certificate for 127.0.0.1 and a client
// certificate into dir, as PEM files.
func pki(t *testing.T, dir string) (ca string, server, client issued) {
	t.Helper()
	caKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	caTemplate := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "tokenwire go test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageDigitalSignature,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTemplate, caTemplate, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	write := func(name, kind string, der []byte) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: kind, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	ca = write("ca.pem", "CERTIFICATE", caDER)
	leaf := func(name string, serial int64, usage x509.ExtKeyUsage, template x509.Certificate) issued {
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		template.SerialNumber = big.NewInt(serial)
		template.Subject = pkix.Name{CommonName: name}
		template.NotBefore, template.NotAfter = time.Now().Add(-time.Hour), time.Now().Add(time.Hour)
		template.KeyUsage = x509.KeyUsageDigitalSignature
		template.ExtKeyUsage = []x509.ExtKeyUsage{usage}
		der, err := x509.CreateCertificate(rand.Reader, &template, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		keyDER, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		return issued{write(name+".pem", "CERTIFICATE", der), write(name+".key", "PRIVATE KEY", keyDER)}
	}
	server = leaf("server", 2, x509.ExtKeyUsageServerAuth, x509.Certificate{
		IPAddresses: []net.IP{net.ParseIP("127.0.0.1")}, DNSNames: []string{"localhost"},
	})
	client = leaf("client", 3, x509.ExtKeyUsageClientAuth, x509.Certificate{DNSNames: []string{"go-client"}})
	return ca, server, client
}

// One locked-down server: mTLS, API keys, and one call at a time.
func TestTLSAPIKeyAndQuota(t *testing.T) {
	dir := t.TempDir()
	ca, serverCert, clientCert := pki(t, dir)
	const apiKey = "go-test-key-0123456789"
	sum := sha256.Sum256([]byte(apiKey))
	keys := filepath.Join(dir, "keys.yaml")
	if err := os.WriteFile(keys, []byte("keys:\n  - tenant: go\n    sha256: "+hex.EncodeToString(sum[:])+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	locked := startServeT(t, append(fastSimulator,
		"--tls-cert", serverCert.cert, "--tls-key", serverCert.key, "--tls-client-ca", ca,
		"--auth-keys-file", keys, "--max-concurrent-calls", "1", "--admission-wait", "0.01")...)
	mtls, err := tokenwire.TLSCredentials(ca, clientCert.cert, clientCert.key)
	if err != nil {
		t.Fatal(err)
	}

	t.Run("plaintext is refused", func(t *testing.T) {
		client := dial(t, locked.address, tokenwire.WithAPIKey(apiKey), tokenwire.WithTimeout(5*time.Second))
		_, err := client.Respond(testContext(t), tokenwire.Request{Prompt: "x"})
		if !errors.Is(err, tokenwire.ErrUnavailable) {
			t.Fatalf("err %v", err)
		}
		t.Log(err)
	})

	t.Run("TLS without a client certificate is refused", func(t *testing.T) {
		creds, err := tokenwire.TLSCredentials(ca, "", "")
		if err != nil {
			t.Fatal(err)
		}
		client := dial(t, locked.address, tokenwire.WithTransportCredentials(creds), tokenwire.WithAPIKey(apiKey),
			tokenwire.WithTimeout(5*time.Second))
		_, err = client.Respond(testContext(t), tokenwire.Request{Prompt: "x"})
		if err == nil {
			t.Fatal("a call without a client certificate went through")
		}
		t.Log(err)
	})

	t.Run("mTLS without an API key is unauthenticated", func(t *testing.T) {
		client := dial(t, locked.address, tokenwire.WithTransportCredentials(mtls))
		_, err := client.Respond(testContext(t), tokenwire.Request{Prompt: "x"})
		var twErr *tokenwire.Error
		if !errors.As(err, &twErr) || twErr.Code != codes.Unauthenticated || twErr.Reason != "MISSING_CREDENTIALS" {
			t.Fatalf("err %v", err)
		}
	})

	t.Run("mTLS with an API key streams, and a second call is over quota", func(t *testing.T) {
		client := dial(t, locked.address, tokenwire.WithTransportCredentials(mtls), tokenwire.WithAPIKey(apiKey))
		stream := client.Stream(testContext(t), tokenwire.Request{
			Prompt: "x", Mode: tokenwire.ModeStream, MaxTokensPerChunk: 1,
			Labels: map[string]string{"tokenwire.sim/inter-token-ms": "20", "tokenwire.sim/answer-tokens": "30"},
		})
		defer stream.Close()
		if _, err := stream.Recv(); err != nil { // the one slot is taken now
			t.Fatal(err)
		}
		_, err := client.Respond(testContext(t), tokenwire.Request{Prompt: "x"})
		var twErr *tokenwire.Error
		if !errors.As(err, &twErr) || twErr.Code != codes.ResourceExhausted || len(twErr.QuotaViolations) == 0 ||
			twErr.QuotaViolations[0].Subject != "server" || !twErr.HasRetryDelay {
			t.Fatalf("err %v, quota %+v", err, twErr)
		}
		result, err := stream.Collect()
		if err != nil || !result.Verified() {
			t.Fatalf("stream over mTLS: %v", err)
		}
	})
}
