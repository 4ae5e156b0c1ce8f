#!/usr/bin/env node
// optserve from Node.js: a complete client of the gRPC API, written from docs/api.md ("Writing a
// client") and the .proto files alone. Read it top to bottom: each numbered part is one step of
// the protocol.
//
//   node client.js [--address HOST:PORT] [--model NAME] [--plan FILE] [--steps N]
//                  [--shards N] [--chunk-bytes N] [--keep]
//   node client.js --list-models [--address HOST:PORT]
//
// It creates a model of two parameters in two groups on two shards (SGD with momentum), loads
// its initial values into every shard, trains it for a few steps (push to every shard at once,
// then pull from every shard), reads its status, tries calls that must fail, drops the model
// (unless --keep) and prints one JSON object on stdout.
//
// The token comes from $OPTSERVE_TOKEN, else from the file named by $OPTSERVE_TOKEN_FILE; TLS is
// on when $OPTSERVE_TLS_CA names a CA file; the .proto files are found under ../../protos (the
// repository's include root) unless $OPTSERVE_PROTO_ROOT names another.
'use strict';

const crypto = require('node:crypto');
const fs = require('node:fs');
const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

// ---- 0. What to do ------------------------------------------------------------------------------

// The model and its training run. `params` are in order: that order is the order of the flat
// layout. Values are row-major (C order). `grads` is one object per step (a gradient per
// parameter); without it, `steps` gradients are made by a formula.
const DEFAULT_PLAN = {
  params: [
    { name: 'weight', shape: [2, 3], init: [0.5, -0.25, 1.0, 0.75, -1.5, 0.125] },
    { name: 'bias', shape: [2], init: [0.1, -0.2] },
  ],
  // Parameter groups with their own hyperparameters; the others form the group "default".
  groups: [{ name: 'no_decay', params: ['bias'], overrides: { weight_decay: 0 } }],
  optimizer: { name: 'sgd', lr: 0.1, momentum: 0.9, weight_decay: 0.01 },
  shards: 2,
  steps: 3,
};

function parseArgs(argv) {
  const args = { address: process.env.OPTSERVE_ADDRESS || '127.0.0.1:50051', keep: false };
  for (let i = 0; i < argv.length; i++) {
    const flag = argv[i];
    const value = () => {
      if (i + 1 >= argv.length) throw new Error(`${flag} needs a value`);
      return argv[++i];
    };
    if (flag === '--address') args.address = value();
    else if (flag === '--model') args.model = value();
    else if (flag === '--plan') args.plan = value();
    else if (flag === '--steps') args.steps = Number(value());
    else if (flag === '--shards') args.shards = Number(value());
    else if (flag === '--chunk-bytes') args.chunkBytes = Number(value());
    else if (flag === '--keep') args.keep = true;
    else if (flag === '--list-models') args.listModels = true;
    else throw new Error(`unknown argument ${flag}`);
  }
  return args;
}

function numel(shape) {
  return shape.reduce((a, b) => a * b, 1); // [] is a scalar: one element
}

function zeros(plan) {
  return Object.fromEntries(plan.params.map((p) => [p.name, new Array(numel(p.shape)).fill(0)]));
}

// Step `step`'s gradient of element i of a parameter, when the plan gives none.
function formulaGradient(step, param) {
  return Array.from({ length: numel(param.shape) }, (_, i) =>
    Math.sin(1 + step + 0.7 * i + param.name.length));
}

// ---- 1. Connecting ------------------------------------------------------------------------------

// The include root: the files are optserve/v1/*.proto and import each other by those paths.
const PROTO_ROOT = process.env.OPTSERVE_PROTO_ROOT || path.resolve(__dirname, '..', '..', 'protos');
const definition = protoLoader.loadSync(
  ['optserve/v1/coordinator.proto', 'optserve/v1/shard.proto'],
  {
    includeDirs: [PROTO_ROOT],
    keepCase: true, // field names as in the .proto files (push_id, not pushId)
    longs: Number, // uint64 versions and int64 shapes as numbers (exact below 2^53)
    enums: String, // DType as 'DTYPE_FLOAT32'
    defaults: true, // unset fields read as their defaults (0, '', [])
    oneofs: true, // a oneof's set field is named by a virtual field: message.payload
  },
);
const v1 = grpc.loadPackageDefinition(definition).optserve.v1;

// The server's own limit: one 4 MiB chunk plus room for the other fields. gRPC's default
// receive limit (4 MiB) is smaller.
const MAX_MESSAGE_BYTES = (4 << 20) + (64 << 10);
const CHANNEL_OPTIONS = {
  'grpc.max_send_message_length': MAX_MESSAGE_BYTES,
  'grpc.max_receive_message_length': MAX_MESSAGE_BYTES,
};
const CALL_TIMEOUT_S = 30;
const CREDENTIALS = process.env.OPTSERVE_TLS_CA
  ? grpc.credentials.createSsl(fs.readFileSync(process.env.OPTSERVE_TLS_CA))
  : grpc.credentials.createInsecure();

// ---- 2. Tokens ----------------------------------------------------------------------------------

function readToken() {
  let token = process.env.OPTSERVE_TOKEN || '';
  if (!token && process.env.OPTSERVE_TOKEN_FILE) {
    token = fs.readFileSync(process.env.OPTSERVE_TOKEN_FILE, 'utf8');
  }
  // A token file ends with a newline; gRPC metadata cannot carry one, and the server would not
  // know the token with it. A token is printable ASCII without spaces: strip both ends.
  token = token.trim();
  return token || null;
}

const TOKEN = readToken();

// Every call, to the coordinator and to every shard, carries the token; control calls also say
// who makes them, for the model's audit log.
function metadata(token = TOKEN) {
  const md = new grpc.Metadata();
  if (token) md.set('authorization', `Bearer ${token}`);
  md.set('x-optserve-caller', `optserve-node-example@${process.pid}`);
  return md;
}

function options(timeoutS = CALL_TIMEOUT_S) {
  return { deadline: Date.now() + timeoutS * 1000 };
}

let coordinator; // the control plane's client (main makes it)
const shardClients = new Map(); // one channel per shard address, kept

function shardClient(address) {
  if (!shardClients.has(address)) {
    shardClients.set(address, new v1.Shard(address, CREDENTIALS, CHANNEL_OPTIONS));
  }
  return shardClients.get(address);
}

// The three kinds of call this client makes, as promises.
function unary(client, method, request, md = metadata()) {
  return new Promise((resolve, reject) => {
    client[method](request, md, options(), (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

// Client streaming (CreateModel, Load, Push): write every message, close, await the answer.
// (For large tensors, wait for 'drain' whenever write() returns false.)
function clientStream(client, method, messages) {
  return new Promise((resolve, reject) => {
    const call = client[method](metadata(), options(), (err, reply) =>
      (err ? reject(err) : resolve(reply)));
    for (const message of messages) call.write(message);
    call.end();
  });
}

// Server streaming (Pull): every message of the answer.
function serverStream(client, method, request) {
  return new Promise((resolve, reject) => {
    const messages = [];
    const call = client[method](request, metadata(), options());
    call.on('data', (message) => messages.push(message));
    call.on('error', reject);
    call.on('end', () => resolve(messages));
  });
}

function codeName(err) {
  return Object.keys(grpc.status).find((name) => grpc.status[name] === err.code) || String(err.code);
}

// ---- 3. Creating a model ------------------------------------------------------------------------

async function createModel(name, plan) {
  const spec = {
    name,
    // dtype is required (DTYPE_UNSPECIFIED is refused); the server keeps float32 masters.
    params: plan.params.map((p) => ({ name: p.name, dtype: 'DTYPE_FLOAT32', shape: p.shape })),
    optimizer_json: JSON.stringify(plan.optimizer),
    num_shards: plan.shards,
    groups: plan.groups.map((g) => ({
      name: g.name, params: g.params, overrides_json: JSON.stringify(g.overrides || {}),
    })),
    // Empty: the defaults (a constant lr, async updates, the server's checkpoint policy).
    schedule_json: '',
    mode_json: '',
    checkpoint_json: '',
  };
  // A client stream of exactly one message: the spec. No tensor travels here.
  return clientStream(coordinator, 'CreateModel', [{ spec }]);
}

// ---- 4. The layout ------------------------------------------------------------------------------

// From a ModelInfo: each group's parameters with their offsets in the group's flat vector, and
// each shard's [start, end) of every group. The ranges are read, never computed.
function layoutOf(info) {
  const shapes = new Map(info.params.map((p) => [p.name, p.shape.map(Number)]));
  const groups = info.groups.map((g) => {
    let offset = 0;
    const params = g.params.map((name) => {
      const shape = shapes.get(name);
      const slot = { name, shape, offset, numel: numel(shape) };
      offset += slot.numel; // concatenated: no padding, no alignment
      return slot;
    });
    return { name: g.name, params, numel: offset };
  });
  const shards = [...info.shards]
    .sort((a, b) => a.index - b.index)
    .map((s) => ({
      index: s.index,
      address: s.address,
      ranges: Object.fromEntries(s.ranges.map((r) => [r.group, [Number(r.start), Number(r.end)]])),
    }));
  return { groups, shards };
}

// Each group's flat vector from per-parameter flat (row-major) values.
function flatten(layout, values) {
  const flats = {};
  for (const group of layout.groups) {
    const flat = new Float64Array(group.numel);
    for (const slot of group.params) {
      const v = values[slot.name];
      if (v.length !== slot.numel) throw new Error(`${slot.name} needs ${slot.numel} values`);
      flat.set(v, slot.offset);
    }
    flats[group.name] = flat;
  }
  return flats;
}

// Per-parameter values from each group's flat vector.
function unflatten(layout, flats) {
  const values = {};
  for (const group of layout.groups) {
    for (const slot of group.params) {
      values[slot.name] = Array.from(flats[group.name].subarray(slot.offset, slot.offset + slot.numel));
    }
  }
  return values;
}

// ---- 5. Tensors as chunks -----------------------------------------------------------------------

// One tensor as TensorChunk messages: float32, little-endian, cut every `chunkBytes` bytes (the
// cuts need not fall between elements). A zero-length tensor is one chunk with shape [0].
function tensorChunks(name, values, chunkBytes) {
  const bytes = Buffer.alloc(values.length * 4);
  values.forEach((v, i) => bytes.writeFloatLE(v, 4 * i));
  const chunks = [];
  let offset = 0;
  do {
    const data = bytes.subarray(offset, offset + chunkBytes);
    chunks.push(offset === 0
      ? { name, dtype: 'DTYPE_FLOAT32', shape: [values.length], offset: 0, data }
      : { name, offset, data }); // later chunks leave dtype and shape unset
    offset += chunkBytes;
  } while (offset < bytes.length);
  return chunks;
}

// This shard's slice of every group, as chunks: all groups, empty ranges included.
function sliceChunks(shard, flats, chunkBytes) {
  const chunks = [];
  for (const [group, [start, end]] of Object.entries(shard.ranges)) {
    chunks.push(...tensorChunks(group, flats[group].subarray(start, end), chunkBytes));
  }
  return chunks;
}

// The tensors of a received stream of chunks, by name: bytes appended in order of offset.
function assemble(chunks) {
  const tensors = {};
  for (const c of chunks) {
    let t = tensors[c.name];
    if (!t) {
      if (Number(c.offset) !== 0) throw new Error(`tensor ${c.name} starts at ${c.offset}`);
      t = tensors[c.name] = { dtype: c.dtype, shape: c.shape.map(Number), parts: [], size: 0 };
    }
    if (Number(c.offset) !== t.size) throw new Error(`tensor ${c.name}: chunk out of order`);
    t.parts.push(c.data);
    t.size += c.data.length;
  }
  const out = {};
  for (const [name, t] of Object.entries(tensors)) {
    if (t.dtype !== 'DTYPE_FLOAT32') throw new Error(`${name} is ${t.dtype}; asked for float32`);
    const bytes = Buffer.concat(t.parts);
    if (bytes.length !== numel(t.shape) * 4) throw new Error(`tensor ${name} is incomplete`);
    out[name] = Float64Array.from({ length: bytes.length / 4 }, (_, i) => bytes.readFloatLE(4 * i));
  }
  return out;
}

// ---- 6. Loading the initial values --------------------------------------------------------------

async function load(model, layout, plan, chunkBytes) {
  const initial = Object.fromEntries(plan.params.map((p) => [p.name, p.init]));
  const flats = flatten(layout, initial);
  // Every shard its own slice, all at once (the loads do not wait for each other).
  const replies = await Promise.all(layout.shards.map((shard) =>
    clientStream(shardClient(shard.address), 'Load',
      [{ header: { model } }, ...sliceChunks(shard, flats, chunkBytes).map((chunk) => ({ chunk }))])));
  return replies.map((r) => Number(r.version));
}

// ---- 7. Pushing a gradient ----------------------------------------------------------------------

// One push: the same header (and push_id) to every shard, every call in flight together. The
// model's leader decides a push only once every shard holds its slice, so pushing to one shard
// and waiting for its answer before the next would wait for the stage timeout, then fail.
async function push(model, layout, grads, version, pushId, chunkBytes) {
  const header = { model, version, trainer: 'optserve-node-example', push_id: pushId };
  const flats = flatten(layout, grads);
  const replies = await Promise.allSettled(layout.shards.map((shard) =>
    clientStream(shardClient(shard.address), 'Push',
      [{ header }, ...sliceChunks(shard, flats, chunkBytes).map((chunk) => ({ chunk }))])));
  const failed = replies.filter((r) => r.status === 'rejected').map((r) => r.reason);
  if (failed.length) {
    // All shards refuse alike; where they differ, the one that is not UNAVAILABLE or
    // DEADLINE_EXCEEDED is the cause (the others waited for the refused push).
    const vague = [grpc.status.UNAVAILABLE, grpc.status.DEADLINE_EXCEEDED];
    throw failed.find((e) => !vague.includes(e.code)) || failed[0];
  }
  const versions = replies.map((r) => Number(r.value.version));
  if (new Set(versions).size !== 1) throw new Error(`shards answered versions ${versions}`);
  return { version: versions[0], staleness: Number(replies[0].value.staleness) };
}

// ---- 8. Pulling the weights ---------------------------------------------------------------------

async function pullOnce(model, layout) {
  return Promise.all(layout.shards.map(async (shard) => {
    const messages = await serverStream(shardClient(shard.address), 'Pull',
      { model, dtype: 'DTYPE_FLOAT32' });
    if (messages.length === 0 || messages[0].payload !== 'header') {
      throw new Error(`shard ${shard.index} sent no header first`);
    }
    const slices = assemble(messages.slice(1).map((m) => m.chunk));
    return { version: Number(messages[0].header.version), slices };
  }));
}

// ---- 9. Shards at different versions ------------------------------------------------------------

// Shards apply the same updates at their own pace: while pushes are in flight, one pull may see
// them at different versions. For weights at one version, pull again until all agree; after a
// few tries, take the slices as they are and call them the lowest version (the Python client
// always does that: the next push then counts its staleness from the oldest slice).
async function pull(model, layout, maxTries = 10) {
  let answers;
  let tries = 0;
  do {
    if (tries > 0) await new Promise((r) => setTimeout(r, 20));
    answers = await pullOnce(model, layout);
    tries += 1;
  } while (new Set(answers.map((a) => a.version)).size > 1 && tries < maxTries);
  const flats = {};
  for (const group of layout.groups) {
    const flat = new Float64Array(group.numel);
    layout.shards.forEach((shard, i) => {
      const [start, end] = shard.ranges[group.name];
      const slice = answers[i].slices[group.name];
      if (slice.length !== end - start) throw new Error(`shard ${shard.index}: bad ${group.name}`);
      flat.set(slice, start);
    });
    flats[group.name] = flat;
  }
  const versions = answers.map((a) => a.version);
  return { weights: unflatten(layout, flats), version: Math.min(...versions), versions, tries };
}

// ---- 10. The run --------------------------------------------------------------------------------

async function expectError(what, fn) {
  try {
    await fn();
  } catch (err) {
    return codeName(err);
  }
  throw new Error(`${what} succeeded; it should have failed`);
}

async function run(args) {
  if (args.listModels) {
    const reply = await unary(coordinator, 'ListModels', {});
    return { models: reply.models };
  }
  const plan = { ...DEFAULT_PLAN, ...(args.plan ? JSON.parse(fs.readFileSync(args.plan, 'utf8')) : {}) };
  if (args.shards) plan.shards = args.shards;
  const steps = plan.grads ? plan.grads.length : (args.steps ?? plan.steps);
  const grads = plan.grads || Array.from({ length: steps }, (_, s) =>
    Object.fromEntries(plan.params.map((p) => [p.name, formulaGradient(s, p)])));
  const chunkBytes = args.chunkBytes || 1 << 20;
  const model = args.model || `node-example-${process.pid}`;
  const out = { model, address: args.address, chunk_bytes: chunkBytes };

  const info = await createModel(model, plan);
  try {
    const layout = layoutOf(info);
    out.initializing = info.initializing;
    out.groups = layout.groups.map((g) => ({ name: g.name, params: g.params.map((p) => p.name) }));
    out.shards = layout.shards;
    out.load_versions = await load(model, layout, plan, chunkBytes);

    let pulled = await pull(model, layout);
    out.initial = { version: pulled.version, weights: pulled.weights };
    out.steps = [];
    let last = null;
    for (const g of grads) {
      const pushId = crypto.randomUUID(); // new for every push, the same on every shard
      const basedOn = pulled.version; // the version of the weights the gradient was computed on
      const answer = await push(model, layout, g, basedOn, pushId, chunkBytes);
      pulled = await pull(model, layout);
      out.steps.push({ push_id: pushId, ...answer, pull_version: pulled.version,
        shard_versions: pulled.versions, pull_tries: pulled.tries });
      last = { grads: g, basedOn, pushId };
    }
    out.final = { version: pulled.version, weights: pulled.weights };

    // The same push again, same push_id: the leader kept its decision, so every shard answers
    // the same version and nothing is applied twice.
    if (last) {
      const again = await push(model, layout, last.grads, last.basedOn, last.pushId, chunkBytes);
      const after = await pull(model, layout);
      out.replay = { push_id: last.pushId, version: again.version, version_after: after.version };
    }

    // The model as the server sees it: Status answers one JSON object (docs/api.md has its keys).
    const status = JSON.parse((await unary(coordinator, 'Status', { model, history: 10 })).status_json);
    out.status = {
      keys: Object.keys(status).sort(),
      version: status.version,
      shard_versions: status.shards.map((s) => s.version),
      groups: Object.fromEntries(Object.entries(status.groups).map(([g, s]) => [g, s.optimizer])),
      trainers: Object.keys(status.trainers),
    };

    // Calls that must fail, and the status code each gets.
    out.errors = {
      // A model of several shards needs a push_id (every shard refuses alike).
      empty_push_id: await expectError('a push without push_id', () =>
        push(model, layout, zeros(plan), pulled.version, '', chunkBytes)),
      unknown_model: await expectError('DescribeModel of an unknown model', () =>
        unary(coordinator, 'DescribeModel', { model: `${model}-absent` })),
      no_token: await expectError('a call without a token', () =>
        unary(coordinator, 'ListModels', {}, metadata(null))).catch(() => 'OK (no auth)'),
    };
  } finally {
    if (!args.keep) {
      await unary(coordinator, 'DropModel', { model });
      out.dropped = true;
    }
  }
  return out;
}

async function main() {
  try {
    const args = parseArgs(process.argv.slice(2));
    coordinator = new v1.Coordinator(args.address, CREDENTIALS, CHANNEL_OPTIONS);
    const out = await run(args);
    process.stdout.write(`${JSON.stringify(out, null, 2)}\n`);
  } catch (err) {
    const code = err.code !== undefined ? `${codeName(err)}: ` : '';
    process.stderr.write(`optserve-node-example: ${code}${err.details || err.message}\n`);
    process.exitCode = 1;
  } finally {
    if (coordinator) coordinator.close();
    for (const client of shardClients.values()) client.close();
  }
}

main();
