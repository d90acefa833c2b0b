/**
 * TLS and mTLS against a real `tokenwire serve --tls-cert --tls-key --tls-client-ca`,
 * with a throwaway CA made by the `openssl` CLI (skipped without it, failed
 * without it under TOKENWIRE_REQUIRE_POLYGLOT=1).
 */

import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";

import { TokenwireClient, TokenwireError, tlsFromFiles } from "../src/index.js";
import { FAST_SIMULATOR, type Served, startServe } from "./helpers.js";

function hasOpenssl(): boolean {
  try {
    execFileSync("openssl", ["version"], { stdio: "ignore" });
    return true;
  } catch {
    return false;
  }
}

/** A CA, a server certificate for 127.0.0.1/localhost and a client certificate. */
function makePki(dir: string): Record<"ca" | "serverCert" | "serverKey" | "clientCert" | "clientKey", string> {
  const path = (name: string) => join(dir, name);
  const openssl = (...args: string[]) => execFileSync("openssl", args, { stdio: "pipe" });
  const ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"];
  openssl("req", "-x509", ...ec, "-keyout", path("ca.key"), "-out", path("ca.pem"), "-days", "1",
    "-subj", "/CN=tokenwire test CA",
    "-addext", "basicConstraints=critical,CA:TRUE",
    "-addext", "keyUsage=critical,keyCertSign,cRLSign");
  const issue = (name: string, subject: string, san: string, usage: string) => {
    writeFileSync(path(`${name}.ext`), `subjectAltName=${san}\nextendedKeyUsage=${usage}\n`);
    openssl("req", ...ec, "-keyout", path(`${name}.key`), "-out", path(`${name}.csr`), "-subj", subject);
    openssl("x509", "-req", "-in", path(`${name}.csr`), "-CA", path("ca.pem"), "-CAkey", path("ca.key"),
      "-CAcreateserial", "-out", path(`${name}.pem`), "-days", "1", "-extfile", path(`${name}.ext`));
  };
  issue("server", "/CN=localhost", "IP:127.0.0.1,DNS:localhost", "serverAuth");
  issue("client", "/CN=tenant-a", "DNS:tenant-a.clients.tokenwire.dev", "clientAuth");
  return {
    ca: path("ca.pem"),
    serverCert: path("server.pem"),
    serverKey: path("server.key"),
    clientCert: path("client.pem"),
    clientKey: path("client.key"),
  };
}

// Like the Python suite's require_tool: skip without the tool, fail under
// TOKENWIRE_REQUIRE_POLYGLOT=1 (CI), where every polyglot test must run.
const opensslMissing = !hasOpenssl();
if (opensslMissing && process.env["TOKENWIRE_REQUIRE_POLYGLOT"] === "1") {
  throw new Error("openssl not found (TOKENWIRE_REQUIRE_POLYGLOT=1)");
}

describe("over mTLS", { skip: opensslMissing ? "openssl not found" : false }, () => {
  let dir: string;
  let pki: ReturnType<typeof makePki>;
  let served: Served;

  before(async () => {
    dir = mkdtempSync(join(tmpdir(), "tokenwire-ts-tls-"));
    pki = makePki(dir);
    served = await startServe(
      ...FAST_SIMULATOR,
      "--tls-cert", pki.serverCert,
      "--tls-key", pki.serverKey,
      "--tls-client-ca", pki.ca,
    );
  });

  after(async () => {
    await served?.stop();
    if (dir) rmSync(dir, { recursive: true, force: true });
  });

  test("a client presenting a certificate the CA signed streams a verified answer", async () => {
    const client = new TokenwireClient(served.address, {
      tls: tlsFromFiles(pki.ca, pki.clientCert, pki.clientKey),
    });
    try {
      const result = await client.stream("over tls", { model: "echo", mode: "stream" }).collect();
      assert.equal(result.text, "over tls");
      assert.ok(result.verified);
      const unary = await client.respond("unary over tls", { model: "echo" });
      assert.equal(unary.text, "unary over tls");
    } finally {
      client.close();
    }
  });

  test("without a client certificate, or in plaintext, the call fails typed", async () => {
    for (const tls of [tlsFromFiles(pki.ca), undefined]) {
      const client = new TokenwireClient(served.address, { timeoutMs: 5_000, ...(tls ? { tls } : {}) });
      try {
        await assert.rejects(client.respond("x", { model: "echo" }), (error: unknown) => {
          assert.ok(error instanceof TokenwireError, String(error));
          return true;
        });
      } finally {
        client.close();
      }
    }
  });

  test("a client certificate needs both cert and key", () => {
    assert.throws(() => tlsFromFiles(pki.ca, pki.clientCert), /both cert and key/);
  });
});
