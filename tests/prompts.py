"""Prompts shared by the greedy-equivalence tests: short and long ones, so that a batch has
prompts of one and of several KV blocks (chunked prefill and preemption get exercised)."""

CODE_PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\nclass Config:\n    def __init__(self, path):\n        self.path = path\n",
    "x = 1",
    "for i in range(10):\n    if i % 2 == 0:\n        print(i)\n    else:\n        continue\n# done with the loop and now"
    " the rest of the program goes here, a longer line to make a prompt of several blocks",
    "return self._data[key]",
]
