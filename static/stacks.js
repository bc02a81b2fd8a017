// The pending operations: one stack per task, in issue order, each op found by its
// idempotency key (from the click on) or by its command id (from the 202 on).
//
// A stack is a frozen array, replaced on every change and never mutated, so what is
// memoized on one (the core's items) sees a change as a new object, and a task with none
// gets the same empty one each time.

/** The stack of a task with no pending op. */
export const NO_OPS = Object.freeze([]);

export function createStacks() {
  /** @type {Map<string, object[]>} task id -> frozen ops in issue order */
  const stacks = new Map();
  /** @type {Map<string, string>} idempotency key -> task id */
  const keyIndex = new Map();

  return {
    /** The task's ops in issue order (`NO_OPS` when it has none). */
    of: (taskId) => stacks.get(taskId) ?? NO_OPS,
    has: (taskId) => stacks.has(taskId),

    find(key) {
      const taskId = keyIndex.get(key);
      return taskId === undefined ? null : stacks.get(taskId)?.find((op) => op.key === key) ?? null;
    },

    findByCommandId(commandId) {
      if (!commandId) return null;
      for (const ops of stacks.values()) {
        const op = ops.find((candidate) => candidate.command_id === commandId);
        if (op) return op;
      }
      return null;
    },

    push(op) {
      stacks.set(op.task_id, Object.freeze([...(stacks.get(op.task_id) ?? NO_OPS), op]));
      keyIndex.set(op.key, op.task_id);
    },

    /**
     * `op` with `changes`, in its place on its stack.
     * @returns {object} the new op; `op` itself, unchanged, when it is on no stack
     */
    replace(op, changes) {
      const ops = stacks.get(op.task_id) ?? NO_OPS;
      if (!ops.includes(op)) return op;
      const next = Object.freeze({ ...op, ...changes });
      stacks.set(op.task_id, Object.freeze(ops.map((candidate) => (candidate === op ? next : candidate))));
      return next;
    },

    remove(op) {
      const rest = (stacks.get(op.task_id) ?? NO_OPS).filter((candidate) => candidate !== op);
      if (rest.length) stacks.set(op.task_id, Object.freeze(rest));
      else stacks.delete(op.task_id);
      keyIndex.delete(op.key);
    },

    /** Every pending op, flat: task by task, each task's in issue order. */
    all: () => [...stacks.values()].flat(),
    /** How many ops are pending, on every task. */
    get size() {
      let count = 0;
      for (const ops of stacks.values()) count += ops.length;
      return count;
    },
  };
}
