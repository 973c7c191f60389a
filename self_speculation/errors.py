"""The one exception type that means "the user asked for something we cannot do", and the checks several scripts
share."""


class UsageError(ValueError):
    """Bad input from the user. Scripts print its message on one line and exit with status 2."""


MAX_SEED = 2**32 - 1  # numpy's limit; lm-eval and the training data order seed numpy and torch with it


def check_seed(seed: int) -> None:
    if not 0 <= seed <= MAX_SEED:
        raise UsageError(f"--seed must be in [0, {MAX_SEED}] (got {seed})")
