import type { Duplex } from 'node:stream';

/** An answer of the gateway that is not a success. */
export class MeshError extends Error {
  constructor(status: number, code: string | null, message: string);
  /** HTTP status the gateway answered (401, 403, 404, 407, 502, 504, ...). */
  status: number;
  /** The `Trellis-Error` code (`policy_denied`, `bad_credentials`, ...), null when absent. */
  code: string | null;
}

export interface ConnectOptions {
  signal?: AbortSignal;
  /** Milliseconds to wait for the gateway's answer to CONNECT (default 30000). */
  timeout?: number;
  /** Extra `tls.connect` options (e.g. `ca`) when the gateway URL is https. */
  tls?: import('node:tls').ConnectionOptions;
}

export interface Service {
  name: string;
  address: string;
  node: string;
  online: boolean;
  ports: string[];
}

export interface Services {
  binding: string;
  account: string;
  address: string;
  services: Service[];
}

export interface Binding {
  id: string;
  secret: string;
  tls: boolean;
  hostname: string;
  port: number;
  gateway: string;
}

export class Mesh {
  constructor(url: string);
  /** The binding id, `b_...`. */
  readonly id: string;
  /** The gateway's base URL without credentials. */
  readonly gateway: string;
  /** The platform's fetch, through the mesh (plain form). Only http:// targets. */
  fetch(input: string | URL | Request, init?: RequestInit): Promise<Response>;
  /** A TCP stream through CONNECT (Node only). */
  connect(target: string, options?: ConnectOptions): Promise<Duplex>;
  connect(host: string, port: number, options?: ConnectOptions): Promise<Duplex>;
  /** GET /.trellis/services. */
  services(): Promise<Services>;
}

/** The client of one binding; `url` defaults to process.env.MESH. */
export function mesh(url?: string): Mesh;
export default mesh;

/** The refusal carried by a Response of `mesh.fetch` (it has `Trellis-Error`), or null. */
export function gatewayError(res: Response): Promise<MeshError | null>;

/** Parses a binding URL; throws a TypeError that never contains the secret. */
export function parseBinding(url: string): Binding;
