// quasar miner and validator under pm2. Edit the flags, then from the clone's root:
//   pm2 start scripts/pm2/ecosystem.config.js --only quasar-miner   (or quasar-validator)
//   pm2 logs quasar-miner          pm2 save && pm2 startup           (start on boot)
// Logs are JSON lines on stderr (pm2's *-error.log).
//
// pm2 stops a process with SIGINT and SIGKILLs it after kill_timeout (default 1.6 s: far too short).
// The miner treats SIGINT as SIGTERM: it finishes the training step in progress and writes a
// checkpoint there (weights + AdamW state, ~240 GB for a 20B-parameter student, minutes on NVMe),
// so it gets 600 s; the validator stops at once and gets 60 s. treekill is off so the signal goes to
// the neuron alone, which ends its own children (they also die with it: PR_SET_PDEATHSIG).
const root = `${__dirname}/../..`;

function neuron(name, args, killTimeoutMs) {
  return {
    name,
    script: `${root}/.venv/bin/quasar`,
    interpreter: "none",
    cwd: root,  // relative paths (--out, --config) are the clone's
    args,
    env: { PYTHONUNBUFFERED: "1" },  // HF_TOKEN for --storage hf: export it before `pm2 start`
    autorestart: true,
    restart_delay: 30000,
    kill_timeout: killTimeoutMs,
    treekill: false,
  };
}

module.exports = {
  apps: [
    neuron("quasar-miner", [
      "miner", "--network", "finney", "--netuid", "24", "--wallet.name", "COLD", "--wallet.hotkey", "HOT",
      "--competition", "sn24", "--config", "my-config.json", "--set", "data.train_cache=caches/train",
      "--device", "cuda", "--out", "miner",
      "--storage", "http", "--host", "0.0.0.0", "--port", "8091", "--public-host", "YOUR_PUBLIC_IP",
    ], 600000),
    neuron("quasar-validator", [
      "validator", "--network", "finney", "--netuid", "24", "--wallet.name", "COLD", "--wallet.hotkey", "HOT",
      "--competition", "sn24", "--device", "cuda", "--out", "validator",
      "--status-host", "0.0.0.0", "--status-port", "8000",
    ], 60000),
  ],
};
