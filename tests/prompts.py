"""Prompts of mixed lengths and languages used by the correctness tests."""

LONG_CONTEXT = (
    "The history of computing is a story of abstraction. Early machines were programmed by "
    "rewiring panels and flipping switches, and every program was tied to the hardware it ran "
    "on. Assemblers let programmers name instructions instead of writing raw numbers; compilers "
    "let them describe computations in terms closer to mathematics; operating systems hid the "
    "details of disks, memory and devices behind files and processes. Each layer made the "
    "layer below it invisible to most people most of the time. Networks then joined machines "
    "together, and the same pattern repeated: protocols were stacked on protocols until a "
    "person could fetch a document from across the world without knowing how a single packet "
    "was routed. Today large language models are served by systems that batch requests from "
    "many users, keep caches of attention keys and values in fixed-size pages, and reuse the "
    "computation for prompts that share a prefix. In one sentence, the main idea of this text "
    "is that"
)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "人工智能的未来是",
    "List three colors of the rainbow:\n1.",
    LONG_CONTEXT,
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "SELECT name, COUNT(*) FROM orders",
]
