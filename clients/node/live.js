#!/usr/bin/env node
// Live captions from Node.js: stream a 16 kHz mono PCM16 recording (raw, or a WAV: its
// samples) on LiveService.StreamLive, print each final segment as a JSON
// line as it comes, and at the end the media and transcription the recording became.
// Bytes the server has not acknowledged are kept; a broken stream is resumed (the server's
// session event says how much it stored) and the rest sent again.
//
//   npm ci --prefix clients/node
//   node clients/node/live.js --target localhost:50051 --key "$MP4T_API_KEY" --realtime lecture.wav
//
// Options: --target, --key (as transcribe.js), --language CODE (default en), --realtime (send
// no faster than the audio plays), --transcribe (run the full job at the end), --protos DIR.
// stdout: {"segment": {...}} per final segment, then {"ended": {"media", "transcription",
// "segments": N, "reconnects": N}}. Exit status 2 on a gRPC error (JSON on stderr).
"use strict";

const fs = require("fs");
const path = require("path");
const crypto = require("crypto");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const CHUNK = 3200; // 100 ms of 16 kHz PCM16, as a recorder hands it over
const BYTES_PER_S = 32000;
const RESUMABLE = new Set([grpc.status.UNAVAILABLE, grpc.status.INTERNAL, grpc.status.CANCELLED,
  grpc.status.UNKNOWN, grpc.status.RESOURCE_EXHAUSTED]);

function parseArgs(argv) {
  const o = { target: process.env.MP4T_TARGET || "localhost:50051", key: process.env.MP4T_API_KEY || "",
    language: "en", realtime: false, transcribe: false, protos: path.resolve(__dirname, "..", "..", "protos"), file: "" };
  for (let i = 0; i < argv.length; i++) {
    const a = argv[i];
    if (a === "--target") o.target = argv[++i];
    else if (a === "--key") o.key = argv[++i];
    else if (a === "--language") o.language = argv[++i];
    else if (a === "--protos") o.protos = path.resolve(argv[++i]);
    else if (a === "--realtime") o.realtime = true;
    else if (a === "--transcribe") o.transcribe = true;
    else if (!o.file && !a.startsWith("-")) o.file = a;
    else { process.stderr.write(`usage: live.js [--target H:P] [--key K] [--realtime] FILE (bad: ${a})\n`); process.exit(1); }
  }
  if (!o.file || !o.key) { process.stderr.write("name a file and pass --key (or MP4T_API_KEY)\n"); process.exit(1); }
  return o;
}

function loadApi(root) {
  const dir = path.join(root, "mp4totext", "v1");
  const files = fs.readdirSync(dir).filter((f) => f.endsWith(".proto")).map((f) => path.join("mp4totext", "v1", f));
  const def = protoLoader.loadSync(files, { includeDirs: [root], keepCase: true, longs: String, enums: String,
    defaults: true, oneofs: true });
  return grpc.loadPackageDefinition(def).mp4totext.v1;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

async function main() {
  const o = parseArgs(process.argv.slice(2));
  let pcm = fs.readFileSync(o.file);
  if (pcm.subarray(0, 4).toString() === "RIFF") pcm = pcm.subarray(pcm.indexOf("data") + 8); // the samples only
  const api = loadApi(o.protos);
  const client = new api.LiveService(o.target, grpc.credentials.createInsecure());
  const md = new grpc.Metadata();
  md.set("authorization", `Bearer ${o.key}`);
  const config = { encoding: "AUDIO_ENCODING_PCM16", sample_rate_hertz: 16000, language_code: o.language };
  if (o.transcribe) config.transcription_config = {};
  const requestId = crypto.randomUUID();
  let session = "", acked = 0, seen = -1, reconnects = 0, segments = 0;
  const started = Date.now();
  for (;;) {
    try {
      const ended = await new Promise((resolve, reject) => {
        const call = client.StreamLive(md);
        let opened = false, done = false;
        call.on("data", (ev) => {
          if (ev.session) { session = ev.session.name; acked = Number(ev.session.committed_size); opened = true; }
          else if (ev.ack) acked = Math.max(acked, Number(ev.ack.committed_size));
          else if (ev.segment && ev.segment.id > seen) {
            seen = ev.segment.id; segments++;
            process.stdout.write(JSON.stringify({ segment: { id: ev.segment.id, text: ev.segment.text } }) + "\n");
          } else if (ev.ended) { done = true; resolve(ev.ended); }
        });
        call.on("error", reject);
        call.on("end", () => { if (!done) reject(Object.assign(new Error("stream ended early"), { code: grpc.status.UNAVAILABLE })); });
        (async () => {
          call.write(session ? { resume: { session, write_offset: String(acked) } }
            : { start: { config, request_id: requestId } });
          while (!opened) await sleep(5); // the session event says where to continue
          for (let off = acked; off < pcm.length; off += CHUNK) {
            if (o.realtime) await sleep(Math.max(0, started + (off / BYTES_PER_S) * 1000 - Date.now()));
            if (done) return;
            call.write({ audio: pcm.subarray(off, off + CHUNK) });
          }
          call.write({ finish: {} });
          call.end();
        })().catch(reject);
      });
      process.stdout.write(JSON.stringify({ ended: { media: ended.media, transcription: ended.transcription,
        segments, reconnects } }) + "\n");
      client.close();
      return 0;
    } catch (err) {
      if (!RESUMABLE.has(err.code) || reconnects >= 10) {
        process.stderr.write(JSON.stringify({ error: { code: err.code, status: Object.keys(grpc.status).find((k) => grpc.status[k] === err.code), message: err.details || err.message } }) + "\n");
        client.close();
        return 2;
      }
      reconnects++;
      await sleep(200 * reconnects);
    }
  }
}

main().then((code) => process.exit(code));
