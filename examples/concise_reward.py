"""A reward of your own: prefers concise answers that end with a full stop.

    python train_eva.py --reward py:examples/concise_reward.py:concise

eva imports this file once per process and calls the function with a batch: the prompts' text and one response
per prompt, in the same order; it wants one float per response back (None or NaN where there is no rating). Under
torchrun each rank calls it with its own share of the batch.
"""


def concise(prompts: list[str], responses: list[str]) -> list[float]:
    """1.0 up to 50 words, falling linearly to 0.0 at 150 words, plus 0.5 when the answer ends with a period;
    0.0 for an empty answer."""
    rewards = []
    for response in responses:
        words = len(response.split())
        if words == 0:
            rewards.append(0.0)
            continue
        brevity = min(1.0, max(0.0, (150 - words) / 100))
        rewards.append(brevity + (0.5 if response.rstrip().endswith(".") else 0.0))
    return rewards
