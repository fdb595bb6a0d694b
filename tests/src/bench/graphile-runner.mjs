// One graphile-worker process for the queue benchmark (tests/src/bench/graphile.rs): the
// configuration graphile-worker's own performance page was measured with (24 concurrent jobs,
// a pool of 25, a local queue of 500, completions and failures batched), one no-op task.
// Prints "ready" once the worker is running; SIGTERM stops it gracefully.
import { run } from "graphile-worker";
import { Logger } from "@graphile/logger";

// Warnings and errors only: graphile-worker logs every completed job at info level.
const logger = new Logger(() => (level, message) => {
  if (level === "error" || level === "warning") {
    console.error(`graphile-worker ${level}: ${message}`);
  }
});

const runner = await run({
  logger,
  taskList: { noop: async () => {} },
  preset: {
    worker: {
      connectionString: process.env.DATABASE_URL,
      concurrentJobs: 24,
      maxPoolSize: 25,
      localQueue: { size: 500 },
      completeJobBatchDelay: 0,
      failJobBatchDelay: 0,
    },
  },
});
console.log("ready");
await runner.promise;
