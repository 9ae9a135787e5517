"""A worker holds every thread pool of its model to its share of the cores (--threads): torch's
intra-op pool, and the Rayon pools of Rust libraries such as Hugging Face tokenizers, which
would otherwise start one thread per core in every worker."""

from __future__ import annotations

WHERE = "isopool.examples.faulty:WhereAmI"


def pools_of(pool, n: int) -> list[dict]:
    with pool.client() as c:
        # n at once, each sleeping: least-loaded dispatch gives each worker one
        return [f.result(30)["pools"] for f in [c.submit(0.3) for _ in range(n)]]


def test_one_thread_each_means_no_tokenizer_pool(start_pool):
    pool = start_pool("--workers", "2", "--threads", "1", "--model", WHERE,
                      env={"RAYON_NUM_THREADS": "", "TOKENIZERS_PARALLELISM": ""})
    assert pools_of(pool, 2) == [{"torch": 1, "rayon": "1", "tokenizers_parallelism": "false"}] * 2


def test_more_threads_size_the_rayon_pool_alike(start_pool):
    pool = start_pool("--workers", "1", "--threads", "2", "--model", WHERE,
                      env={"RAYON_NUM_THREADS": "", "TOKENIZERS_PARALLELISM": ""})
    assert pools_of(pool, 1) == [{"torch": 2, "rayon": "2", "tokenizers_parallelism": ""}]  # left as it was


def test_what_the_user_set_is_kept(start_pool):
    pool = start_pool("--workers", "1", "--threads", "1", "--model", WHERE,
                      env={"RAYON_NUM_THREADS": "3", "TOKENIZERS_PARALLELISM": "true"})
    assert pools_of(pool, 1) == [{"torch": 1, "rayon": "3", "tokenizers_parallelism": "true"}]
