"""The one OpenAI-compatible chat-completions client of eva (standard library only): the reward judge, the
creator's endpoint back-end and the evaluation judges all call it. Any server speaking
`POST <base_url>/chat/completions` works (vllm serve, LiteLLM, SGLang, llama.cpp's server, a hosted API); the key
comes from $OPENAI_API_KEY (or the variable named) as a bearer token, none for a local server.

    text = endpoint.chat("http://localhost:8000/v1", "Qwen/Qwen2.5-7B-Instruct", [{"role": "user", "content": "Hi"}])
    texts = endpoint.chat_many(url, model, [messages_1, messages_2], concurrency=16)  # None where a call failed
    python endpoint.py <base_url> <model> "question"

429, 5xx, timeouts and malformed replies are retried with exponential backoff (Retry-After honoured); other 4xx fail
at once. chat() raises EndpointError naming the URL; chat_many() raises only when every item failed.
"""
import json
import os
import random
import socket
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor


class EndpointError(RuntimeError):
    """A chat-completions call that failed for good (after retries, or at once for a non-retryable reply)."""


def completions_url(base_url: str) -> str:
    """The chat-completions URL for an OpenAI-style base URL."""
    parsed = urllib.parse.urlparse(base_url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"endpoint: {base_url!r} is not an http(s) URL (expected e.g. http://localhost:8000/v1)")
    path = parsed.path.rstrip("/")
    if path.endswith("/chat/completions"):
        return base_url
    if not path:
        path = "/v1"  # vLLM, LiteLLM and OpenAI all serve under /v1
    return urllib.parse.urlunparse(parsed._replace(path=path + "/chat/completions"))


def _retry_delay(attempt: int, backoff: float, retry_after: str | None) -> float:
    if retry_after:
        try:
            return min(float(retry_after), 60.0)
        except ValueError:
            pass  # an HTTP-date Retry-After: fall back to our own schedule
    # Full jitter keeps many threads that failed together from retrying together.
    return backoff * (2 ** attempt) * (0.5 + random.random() / 2)


def chat(base_url: str, model: str, messages: list[dict], *, temperature: float = 0.0, max_tokens: int = 1024,
         timeout: float = 60, retries: int = 4, api_key_env: str = "OPENAI_API_KEY", backoff: float = 1.0,
         extra: dict | None = None) -> str:
    """One chat completion; returns the assistant message's text ("" when the server sent no content).

    timeout is per socket operation (connect, and each read), in seconds. retries counts the tries after the first.
    extra is merged into the request body (top_p, seed, stop, ...).
    """
    url = completions_url(base_url)
    body = {"model": model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens}
    body.update(extra or {})
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    key = os.environ.get(api_key_env) if api_key_env else None
    if key:
        headers["Authorization"] = f"Bearer {key}"
    last = "no attempt made"
    for attempt in range(retries + 1):
        retry_after = None
        try:
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                payload = json.loads(reply.read().decode("utf-8"))
            content = payload["choices"][0]["message"].get("content")
            return content if isinstance(content, str) else ""
        except urllib.error.HTTPError as e:
            detail = e.read(300).decode("utf-8", "replace").replace("\n", " ") if e.fp else ""
            last = f"HTTP {e.code} {detail}".strip()
            if e.code != 429 and e.code < 500:
                raise EndpointError(f"endpoint {url}: {last} (not retried)") from None
            retry_after = e.headers.get("Retry-After") if e.headers else None
        except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
            reason = getattr(e, "reason", e)
            last = f"{type(reason).__name__}: {reason}"
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError, AttributeError) as e:
            last = f"malformed reply ({type(e).__name__}: {e})"
        if attempt < retries:
            time.sleep(_retry_delay(attempt, backoff, retry_after))
    raise EndpointError(f"endpoint {url} failed after {retries + 1} tries: {last}")


def check_reachable(base_url: str, *, timeout: float = 10) -> None:
    """Raise EndpointError naming the URL when nothing answers there (any HTTP reply, even 404, counts)."""
    url = completions_url(base_url).removesuffix("/chat/completions") + "/models"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout):
            pass
    except urllib.error.HTTPError:
        pass  # a server answered: it may just not list models, or want a key for it
    except (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise EndpointError(f"endpoint {base_url} unreachable ({type(reason).__name__}: {reason})") from None


def chat_many(base_url: str, model: str, list_of_messages: list[list[dict]], *, concurrency: int = 8,
              **kwargs) -> list[str | None]:
    """chat() over many conversations in parallel threads, results in input order; None where a call failed.

    Failures are summarised on stderr (count and the last error); the caller decides what a None means.
    Raises EndpointError when every call failed (an unreachable or misconfigured endpoint).
    """
    assert concurrency >= 1, f"concurrency must be >= 1, got {concurrency}"
    if not list_of_messages:
        return []
    errors: list[str] = []

    def one(messages: list[dict]) -> str | None:
        try:
            return chat(base_url, model, messages, **kwargs)
        except EndpointError as e:
            errors.append(str(e))  # list.append is atomic under the GIL
            return None

    with ThreadPoolExecutor(max_workers=min(concurrency, len(list_of_messages))) as pool:
        results = list(pool.map(one, list_of_messages))
    if errors:
        if len(errors) == len(results):
            raise EndpointError(f"all {len(results)} calls failed; last: {errors[-1]}")
        print(f"endpoint: {len(errors)}/{len(results)} calls failed; last: {errors[-1]}", file=sys.stderr)
    return results


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit("usage: python endpoint.py <base_url> <model> <question>")
    print(chat(sys.argv[1], sys.argv[2], [{"role": "user", "content": sys.argv[3]}]))
