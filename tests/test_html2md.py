from koala_lib.data.clean import answer_to_markdown, repair_code_artifacts
from koala_lib.data.html2md import html_to_markdown, looks_like_html

CHATGPT_CODE = (
    '<div class="markdown prose w-full break-words dark:prose-invert light"><p>Try this:</p>'
    '<pre><div class="bg-black mb-4 rounded-md"><div class="flex items-center relative text-gray-200 bg-gray-800 px-4 py-2 '
    'text-xs font-sans"><span class="">python</span><button class="flex ml-auto gap-2"><svg></svg>Copy code</button></div>'
    '<div class="p-4 overflow-y-auto"><code class="!whitespace-pre hljs language-python"><span class="hljs-keyword">if</span> '
    'a &lt; b &amp;&amp; c:\n    <span class="hljs-built_in">print</span>(<span class="hljs-string">"&gt;"</span>)\n</code></div></div></pre></div>'
)


def test_chatgpt_code_block_becomes_a_fenced_block_with_its_language():
    assert html_to_markdown(CHATGPT_CODE) == 'Try this:\n\n```python\nif a < b && c:\n    print(">")\n```'


def test_inline_markup_lists_and_links():
    html = (
        "<p>Use <code>len(x)</code> and <strong>never</strong> <em>guess</em>. See <a href='https://x.org'>docs</a>.</p>"
        "<ol><li><p>First</p><ul><li>nested</li></ul></li><li>Second</li></ol><h2>Title</h2><p>line one<br>line two</p>"
    )
    assert html_to_markdown(html) == (
        "Use `len(x)` and **never** *guess*. See [docs](https://x.org).\n\n"
        "1. First\n   - nested\n2. Second\n\n## Title\n\nline one\nline two"
    )


def test_table_and_blockquote():
    html = "<table><thead><tr><th>a</th><th>b|c</th></tr></thead><tbody><tr><td>1</td><td>2</td></tr></tbody></table><blockquote><p>q</p></blockquote><hr>"
    assert html_to_markdown(html) == "| a | b\\|c |\n| --- | --- |\n| 1 | 2 |\n\n> q\n\n---"


def test_ordered_list_start_and_entities():
    assert html_to_markdown('<ol start="3"><li>x &amp; y</li><li>z</li></ol>') == "3. x & y\n4. z"


def test_broken_markup_is_repaired_not_crashed():
    assert html_to_markdown("<p>unclosed <b>bold<p>next") == "unclosed **bold**\n\nnext"
    assert html_to_markdown("   ") == ""


def test_html_is_detected_only_at_the_start():
    assert looks_like_html('<div class="markdown prose">x</div>')
    assert looks_like_html("<p>Hi</p>")
    assert not looks_like_html("Here is HTML:\n```html\n<div><p>x</p></div>\n```")
    assert answer_to_markdown("Here is HTML:\n```html\n<div><p>x</p></div>\n```") == "Here is HTML:\n```html\n<div><p>x</p></div>\n```"


def test_copy_code_artifacts_are_repaired():
    assert repair_code_artifacts("Run:\n```\npythonCopy code\nprint(1)\n```") == "Run:\n```python\nprint(1)\n```"
    assert repair_code_artifacts("Run:\n```bashCopy code\nls\n```") == "Run:\n```bash\nls\n```"
    assert repair_code_artifacts("A\nCopy code\nx = 1\n\n\n\nB") == "A\nx = 1\n\nB"


def test_toolbar_label_gives_the_language_when_code_has_no_class():
    html = ('<pre><div class="bg-black"><div class="flex"><span>bash</span><button>Copy code</button></div>'
            '<div class="p-4"><code class="!whitespace-pre hljs">ls -la\n</code></div></div></pre>')
    assert html_to_markdown(html) == "```bash\nls -la\n```"


def test_katex_math_is_written_once_as_tex():
    html = ('<p>Area is <span class="katex"><span class="katex-mathml"><math><semantics><mrow><mi>π</mi></mrow>'
            '<annotation encoding="application/x-tex">\\pi r^2</annotation></semantics></math></span>'
            '<span class="katex-html" aria-hidden="true"><span class="mord">πr2</span></span></span>.</p>')
    assert html_to_markdown(html) == "Area is $\\pi r^2$."


def test_paragraphs_inside_a_list_item_stay_paragraphs():
    html = "<ul><li><p>First para.</p><p>Second para.</p><ul><li>sub</li></ul></li></ul>"
    assert html_to_markdown(html) == "- First para.\n\n  Second para.\n  - sub"
