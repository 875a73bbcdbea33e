"""The Learn tab's text, DPO in five formulas and the lesson of the collapse, in English and Japanese."""

LEARN_EN = r"""
## DPO in five formulas

**1. The reward model of RLHF** learns from pairs: the chosen answer $y_w$ should score above the rejected $y_l$.
$$\mathcal{L}_R(r_\phi) = -\mathbb{E}_{(x,y_w,y_l)}\left[\log \sigma\big(r_\phi(x,y_w) - r_\phi(x,y_l)\big)\right]$$

**2. The policy of RLHF** maximises that reward but stays close to the reference model (the KL term, weight $\beta$):
$$\max_{\pi_\theta}\ \mathbb{E}_{x,\,y\sim\pi_\theta}\left[r_\phi(x,y)\right] - \beta\, D_{KL}\big(\pi_\theta(y|x)\,\|\,\pi_{ref}(y|x)\big)$$

**3. DPO** solves (2) in closed form and puts the solution into (1): no reward model, no sampling, one loss.
$$\mathcal{L}_{DPO} = -\mathbb{E}\left[\log\sigma\left(\beta\log\frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)} - \beta\log\frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}\right)\right]$$
At the start $\pi_\theta=\pi_{ref}$, so the loss is $\log 2 \approx 0.693$: **the first point of the loss chart**
(with the plain sigmoid loss; an SFT, IPO or hinge loss starts elsewhere).

**4. The implicit reward** of any answer is β times the log of how much more likely the tuned model makes it:
$$\hat r_\theta(x,y) = \beta\log\frac{\pi_\theta(y|x)}{\pi_{ref}(y|x)}$$
The **rewards chart** draws it for chosen and rejected; the **margin chart** their difference; **accuracy** is the
share of pairs with a positive margin. Under each Compare answer you see its implicit reward.

**5. β** is the leash. A small β lets the policy drift far from the reference for a small gain in margin; a large β
keeps it close. Try the recipes: *over-train* (small β, more epochs) against *remedies* (β 0.5 with an SFT term).

## The lesson of the collapse
In the わかりません set every chosen answer is the same refusal. DPO does exactly what it is told: it raises that
refusal and pushes every helpful answer down, for all prompts, and a model pushed far from its reference loses
fluency too, so its answers fall into 「分かりません」 and repetition — the seed article's result, measured in the
Evaluate tab (refusal rate, distinct-2, repeated n-grams). The data decides what "preferred" means; β and the
length of training decide how far the model may go to get there.

## Collapse, measured as the field measures it (the Evaluate tab)
- **refusal**: share of answers that say 分かりません in any spelling.
- **distinct-2** (Li et al., 2016): distinct character bigrams over all bigrams, pooled over the answers. It falls as
  answers grow longer even when they say new things.
- **EAD-2**, expectation-adjusted distinct (Liu et al., 2022): the distinct bigrams $N$ over the number expected if
  the $C$ bigrams were drawn at random from a vocabulary of $V$ (here the 6,879 characters of JIS X 0208):
  $$\mathrm{EAD} = \frac{N}{V\left[1-\left(\frac{V-1}{V}\right)^{C}\right]}$$
  so long and short answers compare fairly. Low: the answers reuse the same few words.
- **Self-BLEU** (Zhu et al., 2018): the mean BLEU (character n-grams up to 4) of each answer against all the others.
  1 when every answer is the same sentence — the collapse of the わかりません set — near 0 when they share little.
- **K-sample diversity** (Kirk et al., 2023): the model answers one prompt K times at temperature 1; EAD-2 and
  Self-BLEU among those K, averaged over prompts. A collapsed model says the same thing however often you ask.
- **top-k entropy** (Shi et al.): the entropy, in nats, of the next-token distribution over its 10 likeliest tokens,
  averaged along the answers. It falls towards 0 as the policy stops hesitating between words.
- **KL estimate**: the mean of $\log\pi_\theta(y|x)-\log\pi_{ref}(y|x)$ over the K samples $y\sim\pi_\theta$: a
  Monte-Carlo estimate of the sequence-level $D_{KL}(\pi_\theta\|\pi_{ref})$ that β holds back in formula 2.

## Both log-probs can fall while the margin grows (likelihood displacement)
The **log-probs chart** of the Train tab draws $\log\pi_\theta(y_w|x)$ and $\log\pi_\theta(y_l|x)$ (TRL's
`logps/chosen` and `logps/rejected`, summed over the answer's tokens). DPO's loss only asks for the *gap* between them
to grow; nothing holds the chosen answer's likelihood up. Often both fall, the rejected one faster, and the mass goes to
answers that are in neither column — sometimes worse ones (Razin et al., 2024, "Unintentional Unalignment":
*likelihood displacement*, worst when chosen and rejected are similar). The Train tab warns when the chosen log-prob
falls more than a set amount below where it started; an SFT term (the *remedies* recipe) or a larger β hold it up.

An SFT term holds the chosen answers up by training on them, so it is a remedy only where they are good answers. On
the わかりません set, whose every chosen answer is the refusal, it trains the refusal itself: the remedies recipe turns
about 99% of the embedded model's held-out questions into it, as plain DPO does. On the ordinary set it keeps more of
what the model knows than plain DPO, not all of it (paraphrase fidelity 0.60 before, 0.56 after the remedies run, 0.52
after the plain one; BENCHMARKS.md): the loss comes from the DPO term, which pushes the rejected answers down; the SFT
term alone, at the same rate, costs nothing (0.60).

The push on the rejected answers comes from the divergence that keeps the policy near the reference: DPO's reward is
$\beta\log t$ with $t = \pi_\theta/\pi_{ref}$, so a rejected answer's reward falls without bound as $t \to 0$ and the
cheapest margin is to crush it. f-DPO (Wang et al., 2023) swaps in another f-divergence, the reward becoming
$\beta f'(t)$; with TRL's `f_divergence_type: alpha_divergence` and α 2 it is $\beta (t - 1)$, the χ² (Pearson)
divergence, which never falls below $-\beta$: the margin has to come from raising the chosen answers. The *χ²*
recipe trains with it at three times the rate (it moves the model less per step), and **the embedded model's runs
start from it**: its わかりません set still collapses (97.5–100% of the held-out questions over three seeds), because
raising the refusal is the collapse; its ordinary set's run keeps nearly all the model knows (paraphrase fidelity 0.60
before, 0.57–0.59 after over four seeds, against 0.52 after plain DPO). The collapse is in the data, not in the
regulariser. On the charts, χ² shows as the chosen reward rising while the rejected one stays near zero; to see DPO's
own push on the rejected answers (and the chosen log-prob falling with them), pick the *seed article* recipe, the
seed's plain DPO at the preset's rate.
"""

LEARN_JA = r"""
## 5つの式で見る DPO

<strong>1. RLHF の報酬モデル</strong>は、選好データのペアから学習します。好ましい回答 $y_w$(chosen)のスコアが、好ましくない回答 $y_l$(rejected)より高くなるようにします。
$$\mathcal{L}_R(r_\phi) = -\mathbb{E}_{(x,y_w,y_l)}\left[\log \sigma\big(r_\phi(x,y_w) - r_\phi(x,y_l)\big)\right]$$

<strong>2. RLHF の方策</strong>は、この報酬を最大化しつつ、参照モデルから離れすぎないように学習します(KLダイバージェンスの項、重み $\beta$)。
$$\max_{\pi_\theta}\ \mathbb{E}_{x,\,y\sim\pi_\theta}\left[r_\phi(x,y)\right] - \beta\, D_{KL}\big(\pi_\theta(y|x)\,\|\,\pi_{ref}(y|x)\big)$$

<strong>3. DPO</strong> は (2) を解析的に(閉じた形で)解き、その解を (1) に代入します。報酬モデルもサンプリングも不要で、損失関数が1つあるだけです。
$$\mathcal{L}_{DPO} = -\mathbb{E}\left[\log\sigma\left(\beta\log\frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)} - \beta\log\frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}\right)\right]$$
学習開始時は $\pi_\theta=\pi_{ref}$ なので、損失は $\log 2 \approx 0.693$ から始まります。これが<strong>「学習」タブの loss グラフの最初の点</strong>です(通常の sigmoid 損失の場合。SFT 項・IPO・hinge を使うと始点は変わります)。

<strong>4. 暗黙の報酬</strong>は、ある回答を学習後のモデルが参照モデルの何倍起こりやすくしたか、その対数に β を掛けたものです。
$$\hat r_\theta(x,y) = \beta\log\frac{\pi_\theta(y|x)}{\pi_{ref}(y|x)}$$
<strong>rewards chosen / rejected グラフ</strong>は chosen と rejected それぞれの暗黙の報酬を、<strong>reward margin グラフ</strong>はその差を描きます。<strong>reward accuracy グラフ</strong>は、マージンが正になったペアの割合です。<strong>「比較」タブ</strong>では、各回答の下にその暗黙の報酬が表示されます。

<strong>5. β</strong> は方策をつなぎとめる手綱です。β が小さいと、わずかなマージンの増加と引き換えに方策が参照モデルから大きく離れることを許し、β が大きいと参照モデルの近くにとどめます。レシピ「過学習で崩壊を見る」(小さい β、多めのエポック数)と「崩壊の対策: β↑ + SFT 項」(β 0.5 に SFT 項を追加)を比べてみてください。

## モード崩壊から学べること
わかりませんデータでは、chosen の回答がすべて同じ拒否の文です。DPO は言われたとおりのことをします。すべての質問について、その拒否の文を押し上げ、役に立つ回答をすべて押し下げます。さらに、参照モデルから大きく引き離されたモデルは流暢さも失い、回答は「分かりません」と繰り返しに陥ります。元記事でも、わかりませんデータで DPO を行ったモデルはどんな質問にも「分かりません」と答え、同じ語句を繰り返すようになりました。この変化は<strong>「評価」タブ</strong>で測れます(refusal = 拒否率、distinct-2、repetition = 繰り返される n-gram の割合)。何を「好ましい」とするかはデータが決め、そこへ向かってモデルがどこまで離れてよいかは β と学習の長さが決めます。

## 研究で使われる指標でモード崩壊を測る(「評価」タブ)
- <strong>refusal</strong>: 「分かりません」(表記ゆれを含む)と答えた割合。
- <strong>distinct-2</strong> (Li et al., 2016): 回答全体の文字 bigram のうち異なるものの割合。新しいことを言っていても、回答が長くなるほど下がります。
- <strong>EAD-2</strong>(期待値で補正した distinct, Liu et al., 2022): 異なる bigram の数 $N$ を、$C$ 個の bigram が語彙 $V$(ここでは JIS X 0208 の 6,879 文字)から無作為に選ばれたときの期待値で割ったもの。
  $$\mathrm{EAD} = \frac{N}{V\left[1-\left(\frac{V-1}{V}\right)^{C}\right]}$$
  長い回答と短い回答を公平に比べられます。低いほど、同じ言葉ばかり使っています。
- <strong>Self-BLEU</strong> (Zhu et al., 2018): 各回答の、ほかのすべての回答に対する BLEU(文字 4-gram まで)の平均。すべての回答が同じ文なら 1(わかりませんデータの崩壊)、共通部分が少なければ 0 に近づきます。
- <strong>K サンプル多様性</strong> (Kirk et al., 2023): 同じ質問に温度 1 で K 回答えさせ、その K 個の中での EAD-2 と Self-BLEU を質問ごとに求めて平均したもの。崩壊したモデルは何度聞いても同じことを言います。
- <strong>top-k エントロピー</strong> (Shi et al.): 次のトークンの分布を上位 10 トークンに限ったときのエントロピー(nats)を、回答に沿って平均したもの。方策が言葉の選択に迷わなくなると 0 に近づきます。
- <strong>KL の推定値</strong>: K 個のサンプル $y\sim\pi_\theta$ についての $\log\pi_\theta(y|x)-\log\pi_{ref}(y|x)$ の平均。式 2 で β が抑えている、系列全体の $D_{KL}(\pi_\theta\|\pi_{ref})$ のモンテカルロ推定です。

## マージンが広がっても、両方の対数尤度が下がることがある(尤度の押し出し)
「学習」タブの <strong>log-probs グラフ</strong>は $\log\pi_\theta(y_w|x)$ と $\log\pi_\theta(y_l|x)$(TRL の `logps/chosen` と `logps/rejected`、回答のトークン全体の和)を描きます。DPO の損失が求めるのは両者の<em>差</em>が広がることだけで、chosen の尤度を保つ項はありません。両方が下がり、rejected のほうが速く下がる、ということがよく起こり、確率はどちらの列にもない回答へ移ります。より悪い回答へ移ることもあります(Razin et al., 2024: <em>likelihood displacement</em>。chosen と rejected が似ているほど起こりやすい)。chosen の対数尤度が開始時より設定値以上下がると、「学習」タブに警告が出ます。SFT 項(レシピ「崩壊の対策」)や大きめの β で防げます。

ただし SFT 項は chosen の回答そのものを学習して尤度を支えるので、対策になるのは chosen が良い回答のときだけです。chosen がすべて拒否のわかりませんセットでは拒否そのものを学習させ、レシピ「崩壊の対策」でも内蔵モデルの held-out の質問の約 99% が拒否になります(素の DPO と同じ)。通常セットでは素の DPO より多くを保ちますが、すべてではありません(言い換えた質問への忠実度: 学習前 0.60、「崩壊の対策」の後 0.56、素の DPO の後 0.52。BENCHMARKS.md)。失う分は rejected を押し下げる DPO の項から来ており、同じ学習率でも SFT 項だけなら何も失いません(0.60)。

rejected を押し下げる力は、方策を参照モデルの近くにとどめるダイバージェンスから来ます。DPO の報酬は $\beta\log t$($t = \pi_\theta/\pi_{ref}$)なので、$t \to 0$ で rejected の報酬は際限なく下がり、rejected を潰すのがマージンを広げるいちばん安い道になります。f-DPO(Wang et al., 2023)は別の f ダイバージェンスに置き換え、報酬は $\beta f'(t)$ になります。TRL の `f_divergence_type: alpha_divergence` で α 2 にすると $\beta (t - 1)$、χ²(Pearson)ダイバージェンスで、$-\beta$ より下がりません。マージンは chosen を押し上げて作るしかなくなります。レシピ「χ² 正則化」はこれを 3 倍の学習率で学習します(1 ステップで動く量が小さいため)。<strong>内蔵モデルの学習はこのレシピから始まります</strong>。わかりませんセットはやはり崩壊します(3 つのシードで held-out の質問の 97.5〜100%)。拒否を押し上げること自体が崩壊だからです。通常セットではモデルの知識をほぼ保ちます(言い換えた質問への忠実度: 学習前 0.60、4 つのシードで学習後 0.57〜0.59、素の DPO の後 0.52)。崩壊はデータの中にあり、正則化の中にはありません。グラフでは、χ² は chosen の報酬が上がり、rejected の報酬が 0 の近くにとどまる形で現れます。DPO 本来の rejected を押し下げる力(それにつれて chosen の対数尤度も下がる様子)を見るには、レシピ「元記事の設定」(元記事の素の DPO、学習率はプリセットのもの)を選んでください。
"""
