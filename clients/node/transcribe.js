#!/usr/bin/env node
// mp4totext from Node.js: upload a file, transcribe it, follow it to the end and print the
// transcript as JSON on stdout. A second-language client that proves the public API
// (protos/mp4totext/v1/) works without any Python: @grpc/grpc-js, with @grpc/proto-loader
// reading the .proto files at run time (no generated code, nothing to keep in sync).
//
//   npm ci --prefix clients/node
//   node clients/node/transcribe.js --target localhost:50051 --key "$MP4T_API_KEY" talk.mp4
//
// Options: --target HOST:PORT (env MP4T_TARGET, default localhost:50051), --key API key or
// end-user token (env MP4T_API_KEY), --language CODE (default "auto"), --protos DIR (the
// include root holding mp4totext/v1/*.proto; default ../../protos next to this script),
// --timeout SECONDS for the whole run (default 600).
//
// stdout: {"media": ..., "transcription": ..., "state": ..., "text": ..., "language_code": ...,
//          "duration_s": ..., "segments": [{"start_s", "end_s", "text"}]}
// On a gRPC error: {"error": {"code": <number>, "status": "<NAME>", "message": ...}} on stderr
// and exit status 2 (exit status 1: bad usage or a file that cannot be read; 3: the job ended
// FAILED or CANCELLED, the JSON on stdout says which).
"use strict";

const crypto = require("crypto");
const fs = require("fs");
const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const CHUNK = 1024 * 1024; // the server's maximum chunk size (1 MiB)
const TERMINAL = new Set([
  "TRANSCRIPTION_STATE_SUCCEEDED",
  "TRANSCRIPTION_STATE_FAILED",
  "TRANSCRIPTION_STATE_CANCELLED",
]);
const ITEM_TERMINAL = new Set([
  "ENHANCEMENT_STATE_SUCCEEDED",
  "ENHANCEMENT_STATE_FAILED",
  "ENHANCEMENT_STATE_CANCELLED",
]);
// Worth another try with the same request_id / after_sequence (as the Python client does).
const RETRYABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.RESOURCE_EXHAUSTED]);

class UsageError extends Error {}

function parseArgs(argv) {
  const opts = {
    target: process.env.MP4T_TARGET || "localhost:50051",
    key: process.env.MP4T_API_KEY || "",
    language: "auto",
    protos: path.resolve(__dirname, "..", "..", "protos"),
    timeout: 600,
    file: "",
  };
  for (let i = 0; i < argv.length; i++) {
    const arg = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new UsageError(`${arg} needs a value`);
      return argv[++i];
    };
    if (arg === "--target") opts.target = value();
    else if (arg === "--key") opts.key = value();
    else if (arg === "--language") opts.language = value();
    else if (arg === "--protos") opts.protos = path.resolve(value());
    else if (arg === "--timeout") opts.timeout = Number(value());
    else if (arg === "-h" || arg === "--help") throw new UsageError("");
    else if (arg.startsWith("-")) throw new UsageError(`unknown option ${arg}`);
    else if (!opts.file) opts.file = arg;
    else throw new UsageError(`one file only (got ${opts.file} and ${arg})`);
  }
  if (!opts.file) throw new UsageError("name the media file to transcribe");
  if (!opts.key) throw new UsageError("no API key: pass --key or set MP4T_API_KEY");
  if (!(opts.timeout > 0)) throw new UsageError("--timeout must be a positive number of seconds");
  return opts;
}

function loadApi(protoRoot) {
  const dir = path.join(protoRoot, "mp4totext", "v1");
  const files = fs.readdirSync(dir).filter((f) => f.endsWith(".proto")).sort()
    .map((f) => path.join("mp4totext", "v1", f));
  if (files.length === 0) throw new UsageError(`no .proto files in ${dir} (set --protos)`);
  const definition = protoLoader.loadSync(files, {
    includeDirs: [protoRoot], // google/protobuf/*.proto come with protobufjs
    keepCase: true, // field names exactly as in the .proto files
    longs: String,
    enums: String,
    defaults: true,
    oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).mp4totext.v1;
}

function seconds(duration) {
  if (!duration) return 0;
  return Number(duration.seconds || 0) + (duration.nanos || 0) / 1e9;
}

function unary(client, method, request, metadata, deadline) {
  return new Promise((resolve, reject) => {
    client[method](request, metadata, { deadline }, (err, response) => (err ? reject(err) : resolve(response)));
  });
}

// Single-stream upload: metadata first, then 1 MiB chunks with their write offsets. The
// request_id makes a retried upload return the same media instead of a second copy.
function uploadOnce(media, file, metadata, deadline, requestId) {
  const data = fs.readFileSync(file);
  const sha256 = crypto.createHash("sha256").update(data).digest("hex");
  return new Promise((resolve, reject) => {
    const call = media.UploadMedia(metadata, { deadline }, (err, response) => (err ? reject(err) : resolve(response.media)));
    call.write({
      metadata: {
        filename: path.basename(file),
        content_type: "",
        size_bytes: String(data.length),
        sha256,
        request_id: requestId,
      },
    });
    for (let offset = 0; offset < data.length; offset += CHUNK) {
      call.write({ chunk: { data: data.subarray(offset, offset + CHUNK), write_offset: String(offset) } });
    }
    call.end();
  });
}

async function withRetries(fn, deadline) {
  for (let attempt = 1; ; attempt++) {
    try {
      return await fn();
    } catch (err) {
      const wait = Math.min(200 * 2 ** attempt, 5000);
      if (!RETRYABLE.has(err.code) || attempt >= 8 || Date.now() + wait >= deadline.getTime()) throw err;
      await new Promise((r) => setTimeout(r, wait));
    }
  }
}

function ended(event) {
  return TERMINAL.has(event.state) && (event.enhancements || []).every((i) => ITEM_TERMINAL.has(i.state));
}

// Follows WatchTranscription to the terminal event, reconnecting after a broken stream with
// after_sequence so no event is seen twice.
async function watch(transcriptions, name, metadata, deadline) {
  let last = "0";
  for (let failures = 0; ; ) {
    const outcome = await new Promise((resolve) => {
      const stream = transcriptions.WatchTranscription({ name, after_sequence: last }, metadata, { deadline });
      let done = null;
      stream.on("data", (event) => {
        if (!event.heartbeat) {
          failures = 0;
          if (BigInt(event.sequence) > BigInt(last)) last = event.sequence;
          process.stderr.write(`${event.state} ${event.stage} ${Number(event.progress_percent).toFixed(1)}%\n`);
        }
        if (ended(event)) {
          done = event;
          stream.cancel();
        }
      });
      stream.on("error", (err) => resolve(done ? { event: done } : { err }));
      stream.on("end", () => resolve(done ? { event: done } : { err: null }));
    });
    if (outcome.event) return outcome.event;
    const err = outcome.err;
    const resumable = !err || [grpc.status.UNAVAILABLE, grpc.status.INTERNAL, grpc.status.UNKNOWN].includes(err.code);
    if (!resumable || ++failures > 20 || Date.now() >= deadline.getTime()) {
      throw err || new Error("watch stream kept ending before the job did");
    }
    await new Promise((r) => setTimeout(r, Math.min(200 * 2 ** failures, 5000)));
  }
}

async function main() {
  const opts = parseArgs(process.argv.slice(2));
  if (!fs.existsSync(opts.file)) throw new UsageError(`no such file: ${opts.file}`);
  const api = loadApi(opts.protos);
  const credentials = grpc.credentials.createInsecure();
  const media = new api.MediaService(opts.target, credentials);
  const transcriptions = new api.TranscriptionService(opts.target, credentials);
  const metadata = new grpc.Metadata();
  metadata.set("authorization", `Bearer ${opts.key}`);
  const deadline = new Date(Date.now() + opts.timeout * 1000);
  try {
    const uploadId = crypto.randomUUID();
    const uploaded = await withRetries(() => uploadOnce(media, opts.file, metadata, deadline, uploadId), deadline);
    const createId = crypto.randomUUID();
    const job = await withRetries(() => unary(transcriptions, "CreateTranscription", {
      media: uploaded.name,
      config: { language_code: opts.language },
      request_id: createId,
    }, metadata, deadline), deadline);
    await watch(transcriptions, job.name, metadata, deadline);
    const done = await withRetries(() => unary(transcriptions, "GetTranscription", {
      name: job.name,
      view: "TRANSCRIPTION_VIEW_FULL",
    }, metadata, deadline), deadline);
    const result = done.result || {};
    process.stdout.write(JSON.stringify({
      media: uploaded.name,
      sha256: uploaded.sha256,
      transcription: done.name,
      state: done.state,
      error_message: done.error_message,
      text: result.text || "",
      language_code: result.language_code || "",
      duration_s: seconds(result.duration),
      segments: (result.segments || []).map((s) => ({
        start_s: seconds(s.start_offset),
        end_s: seconds(s.end_offset),
        text: s.text,
      })),
    }) + "\n");
    return done.state === "TRANSCRIPTION_STATE_SUCCEEDED" ? 0 : 3;
  } finally {
    media.close();
    transcriptions.close();
  }
}

main().then(
  (code) => {
    process.exitCode = code;
  },
  (err) => {
    if (err instanceof UsageError) {
      if (err.message) process.stderr.write(`error: ${err.message}\n`);
      process.stderr.write("usage: transcribe.js [--target HOST:PORT] [--key KEY] [--language CODE] FILE\n");
      process.exitCode = 1;
    } else if (typeof err.code === "number") {
      const status = Object.keys(grpc.status).find((k) => grpc.status[k] === err.code) || String(err.code);
      process.stderr.write(JSON.stringify({ error: { code: err.code, status, message: err.details || err.message } }) + "\n");
      process.exitCode = 2;
    } else {
      process.stderr.write(`error: ${err.stack || err}\n`);
      process.exitCode = 1;
    }
  },
);
