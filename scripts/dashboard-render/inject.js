// Publishes the messages `persistence-agent produce --sample` cannot: invalid input (so the failure
// panels of the dashboard have something to show) and duplicates. Used by scripts/render-dashboard.sh.
// (kafkajs rather than kcat: Debian's kcat/librdkafka 2.0.2 cannot talk to tansu 0.6.)
//
// Env: KAFKA_BROKERS, TOPIC, DURATION (s), RATE (the sample traffic's msg/s, to size the failures),
// FAILURE_PERMILLE (steady invalid messages per 1000 sample requests), BURST (invalid messages sent
// over ~10 s at 60 % of DURATION), RUN (a unique id for request ids).
"use strict";
process.env.KAFKAJS_NO_PARTITIONER_WARNING = "1";
const { Kafka, logLevel } = require("kafkajs");

const env = (k, d) => process.env[k] ?? d;
const brokers = env("KAFKA_BROKERS", "127.0.0.1:9092").split(",");
const topic = env("TOPIC", "persistence.requests");
const duration = Number(env("DURATION", "600"));
const rate = Number(env("RATE", "20"));
const permille = Number(env("FAILURE_PERMILLE", "10"));
const burst = Number(env("BURST", "120"));
const run = env("RUN", String(Date.now()));
const BATCH_S = 5;

const request = (user, id, book, score) => JSON.stringify({
  userId: user,
  context: { mood: "curioso", profile: "avanzado", interests: ["historia"], intent: "aprendizaje" },
  justifiedBooks: [{ bookId: book, score, justification: "demo", keyReasons: ["theme"] }],
  metadata: { processingTime: 1200, agentsUsed: ["context", "scoring"], requestId: id },
});

// The n-th invalid message, rotating through the failure classes.
function invalid(n) {
  const key = `dash-bad-${n % 20}`, id = `dash-${run}-bad-${n}`;
  switch (n % 5) {
    case 0: return { key, value: Buffer.from(`\x07\x01garbage bytes ${id}`, "latin1") }; // decode
    case 1: return { key, value: `{"userId": "${key}", "context": ` };                     // decode (invalid JSON)
    case 2: return { key, value: Buffer.from([0, 0, 0, 0x03, 0xe7, 2, 0x78]) };           // schema (unknown id 999)
    case 3: return { key, value: request(key, id, "book-007", 1.5) };                     // validation
    default: return { key, value: request(key, id, "book-999", 0.5) };                    // foreign key (unknown book)
  }
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
let stop = false;
process.on("SIGTERM", () => { stop = true; });
process.on("SIGINT", () => { stop = true; });

(async () => {
  const kafka = new Kafka({ brokers, clientId: `dash-inject-${run}`, logLevel: logLevel.WARN });
  const producer = kafka.producer({ allowAutoTopicCreation: false });
  await producer.connect();
  const t0 = Date.now();
  const elapsed = () => (Date.now() - t0) / 1000;
  let n = 0, carry = 0, batch = 0, burstDone = burst <= 0, sent = { invalid: 0, duplicate: 0 };
  while (!stop && elapsed() < duration) {
    const messages = [];
    carry += rate * BATCH_S * permille;
    for (; carry >= 1000; carry -= 1000) { messages.push(invalid(n++)); sent.invalid++; }
    // a duplicate: the same request id twice (persisted, then duplicate)
    const user = `dash-dup-${batch % 10}`;
    const dup = request(user, `dash-${run}-dup-${batch}`, `book-0${10 + (batch % 90)}`, 0.8);
    messages.push({ key: user, value: dup }, { key: user, value: dup });
    sent.duplicate++;
    await producer.send({ topic, messages }).catch((e) => console.error(`send: ${e.message}`));
    if (!burstDone && elapsed() >= duration * 0.6) {
      burstDone = true;
      for (let s = 0; s < 10 && !stop; s++) {
        const b = [];
        for (let i = 0; i < Math.ceil(burst / 10); i++) { b.push(invalid(n++)); sent.invalid++; }
        await producer.send({ topic, messages: b }).catch((e) => console.error(`send: ${e.message}`));
        await sleep(1000);
      }
    }
    batch++;
    for (let w = 0; w < BATCH_S * 10 && !stop; w++) await sleep(100);
  }
  await producer.disconnect();
  console.log(JSON.stringify({ sent }));
})().catch((e) => { console.error(e); process.exit(1); });
