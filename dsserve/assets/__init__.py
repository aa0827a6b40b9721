"""Files that ship with dsserve: DeepSeek-R1's chat template and a generator of tiny random checkpoints."""
