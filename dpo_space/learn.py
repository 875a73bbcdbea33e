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
"""
