/**
 * Test fixtures: a real `tokenwire serve` process, and a loopback TCP proxy
 * whose connections a test can cut (a dropped network, for real).
 */

import { type ChildProcess, spawn } from "node:child_process";
import { once } from "node:events";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";

/** Fast but not instant generation, as in the Python suite's FAST_SIMULATOR. */
export const FAST_SIMULATOR = ["--sim-time-to-first-token", "0", "--sim-inter-token-delay", "0.0005"];

export interface Served {
  address: string;
  stop(): Promise<void>;
}

/**
 * Starts `tokenwire serve` on a free port with no audit file: the command is
 * `TOKENWIRE_SERVE_CMD` (space-separated) or `tokenwire serve`; `flags` add
 * to `--port 0 --audit-path :memory:`. Resolves once it prints `serving on HOST:PORT`.
 */
export async function startServe(...flags: string[]): Promise<Served> {
  const command = (process.env["TOKENWIRE_SERVE_CMD"] ?? "tokenwire serve").split(" ").filter(Boolean);
  const [program, ...args] = command;
  if (program === undefined) throw new Error("TOKENWIRE_SERVE_CMD is empty");
  // Like the Python suite: no TOKENWIRE_* settings leak in from the environment.
  const env = Object.fromEntries(
    Object.entries(process.env).filter(([key]) => !key.startsWith("TOKENWIRE_")),
  );
  const child = spawn(program, [...args, "--port", "0", "--audit-path", ":memory:", ...flags], {
    env,
    stdio: ["ignore", "pipe", "pipe"],
  });
  let stderr = "";
  child.stderr!.setEncoding("utf8");
  child.stderr!.on("data", (data: string) => {
    stderr = (stderr + data).slice(-4000);
  });
  const lines = createInterface({ input: child.stdout! });
  const address = await new Promise<string>((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`tokenwire serve did not start:\n${stderr}`)), 30_000);
    child.once("error", (error) => {
      clearTimeout(timer);
      reject(error);
    });
    child.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`tokenwire serve exited with ${code}:\n${stderr}`));
    });
    lines.once("line", (line) => {
      clearTimeout(timer);
      const match = /serving on \S+:(\d+)/.exec(line);
      if (match) resolve(`127.0.0.1:${match[1]}`);
      else reject(new Error(`unexpected first line: ${line}`));
    });
  });
  child.removeAllListeners("exit");
  return { address, stop: () => stopProcess(child) };
}

async function stopProcess(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = once(child, "exit");
  child.kill("SIGTERM");
  const timer = setTimeout(() => child.kill("SIGKILL"), 5_000);
  await exited;
  clearTimeout(timer);
}

/** Writes a file into a fresh temporary directory; returns its path and a cleanup. */
export function tempFile(name: string, content: string): { path: string; remove(): void } {
  const dir = mkdtempSync(join(tmpdir(), "tokenwire-ts-"));
  const path = join(dir, name);
  writeFileSync(path, content);
  return { path, remove: () => rmSync(dir, { recursive: true, force: true }) };
}

/** A loopback TCP proxy to `target`; `cut()` drops every open connection both ways. */
export class CuttableProxy {
  connections = 0;
  private readonly server: net.Server;
  private readonly sockets = new Set<net.Socket>();

  constructor(private readonly target: string) {
    this.server = net.createServer((client) => this.serve(client));
  }

  async start(): Promise<string> {
    this.server.listen(0, "127.0.0.1");
    await once(this.server, "listening");
    const { port } = this.server.address() as net.AddressInfo;
    return `127.0.0.1:${port}`;
  }

  private serve(client: net.Socket): void {
    this.connections += 1;
    const at = this.target.lastIndexOf(":");
    const upstream = net.connect(Number(this.target.slice(at + 1)), this.target.slice(0, at));
    for (const socket of [client, upstream]) {
      this.sockets.add(socket);
      socket.on("error", () => undefined);
      socket.on("close", () => {
        this.sockets.delete(socket);
        client.destroy();
        upstream.destroy();
      });
    }
    client.pipe(upstream);
    upstream.pipe(client);
  }

  /** Drops every open connection at once (RST both ways); new ones are still accepted. */
  cut(): void {
    for (const socket of this.sockets) socket.resetAndDestroy();
    this.sockets.clear();
  }

  async close(): Promise<void> {
    this.cut();
    this.server.close();
    await once(this.server, "close");
  }
}
