"""The linear-chain CRF against brute-force enumeration of every tag path on tiny cases."""

import itertools

import pytest
import torch

from rnnkit.models.crf import LinearChainCRF


def random_crf(num_tags: int, seed: int) -> LinearChainCRF:
    torch.manual_seed(seed)
    crf = LinearChainCRF(num_tags).double()
    with torch.no_grad():
        for parameter in crf.parameters():
            parameter.normal_()
    return crf


def brute_force_score(crf: LinearChainCRF, emissions: torch.Tensor, path) -> torch.Tensor:
    """score(y) written out term by term for one sentence's (T, K) emissions."""
    score = crf.start[path[0]] + crf.end[path[-1]]
    for t, tag in enumerate(path):
        score = score + emissions[t, tag]
        if t:
            score = score + crf.transitions[path[t - 1], tag]
    return score


def all_paths(length: int, num_tags: int):
    return list(itertools.product(range(num_tags), repeat=length))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_log_partition_equals_log_sum_over_all_paths(seed):
    crf = random_crf(3, seed)
    lengths = torch.tensor([4, 1, 3])
    emissions = torch.randn(3, 4, 3, dtype=torch.float64)
    got = crf.log_partition(emissions, lengths)
    for b, length in enumerate(lengths.tolist()):
        scores = [brute_force_score(crf, emissions[b], p) for p in all_paths(length, 3)]
        torch.testing.assert_close(got[b], torch.logsumexp(torch.stack(scores), 0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_path_score_equals_the_written_out_sum(seed):
    crf = random_crf(4, seed)
    lengths = torch.tensor([5, 2])
    emissions = torch.randn(2, 5, 4, dtype=torch.float64)
    tags = torch.randint(0, 4, (2, 5))
    got = crf.path_score(emissions, tags, lengths)
    for b, length in enumerate(lengths.tolist()):
        expected = brute_force_score(crf, emissions[b], tags[b, :length].tolist())
        torch.testing.assert_close(got[b], expected)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_viterbi_equals_the_brute_force_best_path(seed):
    crf = random_crf(3, seed)
    lengths = torch.tensor([5, 3, 1])
    emissions = torch.randn(3, 5, 3, dtype=torch.float64)
    decoded = crf.decode(emissions, lengths)
    for b, length in enumerate(lengths.tolist()):
        paths = all_paths(length, 3)
        scores = torch.stack([brute_force_score(crf, emissions[b], p) for p in paths])
        assert decoded[b, :length].tolist() == list(paths[int(scores.argmax())])
        assert (decoded[b, length:] == -1).all()


def test_probabilities_of_all_paths_sum_to_one():
    crf = random_crf(3, 5)
    emissions = torch.randn(1, 3, 3, dtype=torch.float64)
    nll = torch.stack(
        [crf.neg_log_likelihood(emissions, torch.tensor([p])) for p in all_paths(3, 3)]
    )
    torch.testing.assert_close(torch.exp(-nll).sum(), torch.tensor(1.0, dtype=torch.float64))


def test_nll_gradient_matches_finite_differences():
    crf = random_crf(3, 7)
    emissions = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    tags = torch.randint(0, 3, (2, 4))
    lengths = torch.tensor([4, 2])
    assert torch.autograd.gradcheck(
        lambda e: crf.neg_log_likelihood(e, tags, lengths), (emissions,)
    )


def test_nll_gradients_are_expected_minus_observed_counts():
    """d NLL / d theta = E_p[feature counts] - gold feature counts, by enumerating paths."""
    crf = random_crf(3, 11)
    emissions = torch.randn(1, 3, 3, dtype=torch.float64, requires_grad=True)
    gold = [2, 0, 1]
    crf.neg_log_likelihood(emissions, torch.tensor([gold])).sum().backward()

    def counts(path):
        emitted = torch.zeros(3, 3, dtype=torch.float64)
        moved = torch.zeros(3, 3, dtype=torch.float64)
        for t, tag in enumerate(path):
            emitted[t, tag] += 1
            if t:
                moved[path[t - 1], tag] += 1
        first = torch.nn.functional.one_hot(torch.tensor(path[0]), 3).double()
        last = torch.nn.functional.one_hot(torch.tensor(path[-1]), 3).double()
        return emitted, moved, first, last

    with torch.no_grad():
        log_z = crf.log_partition(emissions)[0]
        expected = [torch.zeros(3, 3, dtype=torch.float64) for _ in range(2)]
        expected += [torch.zeros(3, dtype=torch.float64) for _ in range(2)]
        for path in all_paths(3, 3):
            probability = torch.exp(brute_force_score(crf, emissions[0], path) - log_z)
            for total, count in zip(expected, counts(path)):
                total += probability * count
    grads = (emissions.grad[0], crf.transitions.grad, crf.start.grad, crf.end.grad)
    for grad, mean, observed in zip(grads, expected, counts(gold)):
        torch.testing.assert_close(grad, mean - observed)


def test_bad_shapes_and_lengths_are_named():
    crf = LinearChainCRF(3)
    with pytest.raises(ValueError, match="num_tags=3"):
        crf.log_partition(torch.randn(2, 4, 5))
    with pytest.raises(ValueError, match="lengths"):
        crf.decode(torch.randn(2, 4, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError, match="num_tags"):
        LinearChainCRF(0)
