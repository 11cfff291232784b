"""Built-in calibration text: varied paragraphs (English, Chinese, other languages, code, numbers, dialogue).

Used when `exporter quantize` gets no `--dataset`. Paired into user/assistant turns and rendered through the
model's chat template, so the calibration activations include the template's special tokens.
"""

from __future__ import annotations

DEFAULT_TEXTS: tuple[str, ...] = (
    # English: explanations, instructions, narrative
    "Photosynthesis is the process by which green plants, algae and some bacteria turn light into chemical energy. "
    "Inside the chloroplasts, chlorophyll absorbs mostly red and blue light, and that energy splits water molecules "
    "into oxygen, protons and electrons. The electrons travel along a transport chain that pumps protons across a "
    "membrane, and the resulting gradient drives the synthesis of ATP. In the Calvin cycle the plant then uses ATP "
    "and NADPH to fix carbon dioxide from the air into three-carbon sugars, which become glucose, starch and "
    "cellulose.",
    "To replace a flat bicycle tyre, shift to the smallest rear cog, open the brake and quick-release lever, and "
    "remove the wheel. Push one side of the tyre into the rim's centre channel, lever the bead off with two tyre "
    "levers and pull out the tube. Run your fingers carefully around the inside of the tyre to find the thorn or "
    "glass that caused the puncture. Inflate the new tube slightly, tuck it in starting at the valve, roll the bead "
    "back on by hand, and pump to the pressure printed on the sidewall.",
    "The old lighthouse keeper had not spoken to anyone in eleven days when the supply boat finally appeared on the "
    "horizon. He watched it for an hour through the salt-stained window, counting the waves that broke over its "
    "bow, and wondered whether the young captain would remember the crate of books he had asked for in March. When "
    "the boat reached the jetty, the first thing handed up was not flour or paraffin but a parcel wrapped in oilcloth, "
    "and inside it, dry and perfect, lay a thick volume of sea charts from 1887.",
    "Interest compounds when the interest earned in one period is added to the principal for the next. A deposit of "
    "1,000 dollars at 5 percent per year grows to 1,050 after one year, 1,102.50 after two and about 1,628.89 after "
    "ten. The rule of 72 gives a quick estimate of the doubling time: divide 72 by the annual rate in percent, so at "
    "6 percent money doubles in roughly 12 years. Inflation works the same way in reverse, slowly shrinking what a "
    "fixed sum of money can buy.",
    "Dear Ms. Alvarez, thank you for your message of 14 March about the delayed shipment. I have checked with our "
    "warehouse in Rotterdam: the pallets left on Tuesday and the tracking number is NL-4471-2290. The delay was "
    "caused by a customs inspection, not by any problem with the goods themselves. We have refunded the express "
    "shipping fee to your account, and our logistics team will call you on Friday morning to confirm the delivery "
    "window. Please do not hesitate to contact me if anything else comes up. Kind regards, Daniel Weber.",
    "Large language models are trained to predict the next token in a sequence. During pretraining they read "
    "trillions of tokens of web text, books and code; during fine-tuning they learn to follow instructions and to "
    "hold a conversation in a fixed chat format, in which special tokens mark where each turn begins and ends. If "
    "the end-of-turn token is missing at inference time, the model may keep generating text for the user's next "
    "turn, which is why export tools must carry the chat template and stop tokens along with the weights.",
    "The French Revolution began in 1789 with a financial crisis that forced King Louis XVI to summon the "
    "Estates-General for the first time since 1614. The Third Estate declared itself a National Assembly, and on 14 "
    "July a crowd stormed the Bastille. Over the next decade France abolished feudal privileges, issued the "
    "Declaration of the Rights of Man and of the Citizen, executed the king, fought most of Europe and passed "
    "through the Terror before Napoleon Bonaparte seized power in the coup of 18 Brumaire in 1799.",
    "User: My sourdough starter smells like nail polish remover. Is it ruined?\n"
    "Assistant: Probably not. An acetone smell usually means the yeast and bacteria have run out of food and are "
    "producing ethyl acetate. Discard all but a tablespoon of the starter, feed it equal weights of flour and "
    "water, and keep it somewhere warm. Feed it twice a day for two or three days; once it doubles within six to "
    "eight hours and smells tangy rather than sharp, it is ready to bake with again.",
    "A well-designed command line tool does one thing, reads its input from files or standard input, writes its "
    "results to standard output and its diagnostics to standard error, and exits with a non-zero status when "
    "something goes wrong. Error messages should say what failed, where, and what was expected, in one line the "
    "user can act on. Long operations should show progress, and an interrupted run should never leave behind a "
    "half-written file that looks complete.",
    "The recipe serves four. Finely chop two onions and three cloves of garlic and soften them in olive oil over a "
    "low heat for ten minutes. Add a teaspoon each of cumin and smoked paprika, then 400 grams of red lentils, a tin "
    "of chopped tomatoes and one litre of vegetable stock. Simmer for 25 minutes, stirring now and then, until the "
    "lentils collapse. Season with salt, pepper and the juice of half a lemon, and serve with yoghurt and warm bread.",
    "Mount Everest, 8,849 metres high, sits on the border between Nepal and the Tibet Autonomous Region of China. "
    "The first confirmed ascent was made by Edmund Hillary and Tenzing Norgay on 29 May 1953 via the South Col "
    "route. Today hundreds of climbers reach the summit each spring during short windows of calm weather, yet the "
    "mountain remains dangerous: above 8,000 metres the air holds only a third of the oxygen available at sea level, "
    "and frostbite, avalanches and altitude sickness claim lives nearly every season.",
    "Question: A train leaves at 09:40 and arrives at 13:05. How long is the journey? Answer: From 09:40 to 12:40 is "
    "three hours, and from 12:40 to 13:05 is another 25 minutes, so the journey takes 3 hours and 25 minutes, or 205 "
    "minutes in total. If the train covers 287 kilometres in that time, its average speed is 287 divided by 205/60 "
    "hours, which is about 84 kilometres per hour.",
    # Chinese
    "人工智能是计算机科学的一个分支，研究如何让机器完成通常需要人类智能才能完成的任务，例如理解语言、识别图像和做出决策。"
    "近年来，大规模预训练语言模型取得了显著进展，它们通过阅读海量文本学习语言规律，再经过指令微调，"
    "就能够回答问题、撰写文章和编写代码。不过，这些模型也可能产生看似合理但实际上错误的内容，因此在实际应用中仍需要人工审核。",
    "春天到了，公园里的桃花和樱花都开了。周末的早晨，很多家庭带着孩子来这里放风筝、野餐。"
    "湖边的柳树抽出了嫩绿的新芽，几只白鹭站在浅水里一动不动，等待着小鱼游过。老人们在树荫下下象棋，"
    "旁边围着一圈看热闹的人，时不时有人忍不住出主意，却被下棋的人笑着赶开。",
    "用户：请帮我写一封请假邮件，我下周三要去医院复查。\n助手：好的，下面是一封简洁的请假邮件："
    "“王经理您好，我因需前往医院进行复查，特申请于下周三（3月20日）请假一天。手头的工作我已安排妥当，"
    "紧急事务可通过电话联系我。给您带来不便，敬请谅解。此致敬礼！李明”。",
    "长城是中国古代的军事防御工程，修筑历史可以追溯到两千多年前的春秋战国时期。秦始皇统一六国后，"
    "把各国原有的城墙连接起来，形成了万里长城的雏形。今天人们看到的砖石长城大多是明代修建的，"
    "东起山海关，西至嘉峪关，全长六千多公里。1987年，长城被列入世界文化遗产名录。",
    "量化是一种压缩神经网络的方法：把原本用十六位浮点数存储的权重转换成四位或八位整数，并为每一组权重保存一个缩放因子。"
    "这样模型占用的显存可以减少到原来的四分之一左右，推理速度也可能提高。GPTQ 和 AWQ 等方法会利用一小部分校准数据，"
    "尽量减少量化带来的误差，使模型的效果接近原始模型。",
    "问：一个长方形的长是12厘米，宽是长的一半，它的面积和周长各是多少？答：宽是12÷2=6厘米，"
    "面积是12×6=72平方厘米，周长是(12+6)×2=36厘米。如果把它的长和宽都扩大到原来的2倍，"
    "面积就会变成原来的4倍，也就是288平方厘米。",
    "中国的传统节日有春节、元宵节、清明节、端午节、中秋节和重阳节等。春节是最重要的节日，"
    "人们贴春联、放鞭炮、吃年夜饭，晚辈给长辈拜年，长辈给孩子压岁钱。中秋节时，一家人团聚在一起赏月、吃月饼，"
    "表达对团圆和美好生活的期盼。",
    "这家小餐馆开在老城区的一条巷子里，门面不大，但每天中午都坐满了附近上班的人。"
    "招牌菜是红烧牛肉面，汤头用牛骨熬了整整一夜，面条是老板每天早上手工拉的，筋道爽滑。"
    "一碗面二十八元，加一份卤蛋再加三元。老板说，他做这一行已经二十年了，最大的心愿就是让客人吃得放心。",
    # Other languages
    "La cuisine française est réputée pour la variété de ses produits régionaux. En Bretagne on mange des crêpes et "
    "des fruits de mer, en Alsace de la choucroute, et en Provence on cuisine à l'huile d'olive avec des herbes, des "
    "tomates et de l'ail. Le repas se termine souvent par un plateau de fromages : la France en produit plus de mille "
    "variétés, du camembert normand au roquefort affiné dans les caves du Larzac.",
    "Die Energiewende in Deutschland hat das Ziel, die Stromversorgung bis zur Mitte des Jahrhunderts weitgehend auf "
    "erneuerbare Energien umzustellen. Windkraft und Photovoltaik liefern inzwischen mehr als die Hälfte des Stroms, "
    "doch der Ausbau der Netze von Norden nach Süden und die Speicherung von Energie für windstille Wintertage bleiben "
    "große Herausforderungen. Viele Gemeinden beteiligen sich mit Bürgerwindparks direkt an den Erträgen.",
    "El río Amazonas es el más caudaloso del mundo y atraviesa Perú, Colombia y Brasil antes de desembocar en el "
    "océano Atlántico. Su cuenca alberga la mayor selva tropical del planeta, con millones de especies de insectos, "
    "miles de especies de árboles y comunidades indígenas que viven allí desde hace miles de años. La deforestación "
    "amenaza este ecosistema, que regula el clima y las lluvias de buena parte de Sudamérica.",
    "日本の四季ははっきりしていて、春には桜、夏には花火大会、秋には紅葉、冬には雪景色を楽しむことができます。"
    "京都には千年以上の歴史を持つ寺や神社が多く、毎年たくさんの観光客が訪れます。"
    "旅行の際は、電車の乗り換えや食事のマナーについて事前に調べておくと安心です。",
    "Москва — столица России и один из крупнейших городов Европы. В центре города находятся Кремль и Красная "
    "площадь, а московское метро, открытое в 1935 году, славится своими станциями, украшенными мозаикой, "
    "мрамором и люстрами. Каждый день метро перевозит миллионы пассажиров.",
    "한국어는 한글이라는 고유한 문자를 사용합니다. 한글은 1443년 세종대왕이 백성들이 쉽게 배울 수 있도록 만들었으며, "
    "자음과 모음을 조합하여 음절을 만드는 과학적인 문자로 평가받습니다. 매년 10월 9일은 한글날로 기념합니다.",
    # Code
    "def merge_sorted(a: list[int], b: list[int]) -> list[int]:\n"
    '    """Merge two sorted lists into one sorted list in O(len(a) + len(b))."""\n'
    "    out, i, j = [], 0, 0\n"
    "    while i < len(a) and j < len(b):\n"
    "        if a[i] <= b[j]:\n"
    "            out.append(a[i])\n"
    "            i += 1\n"
    "        else:\n"
    "            out.append(b[j])\n"
    "            j += 1\n"
    "    out.extend(a[i:])\n"
    "    out.extend(b[j:])\n"
    "    return out\n\n\n"
    "assert merge_sorted([1, 4, 9], [2, 3, 10]) == [1, 2, 3, 4, 9, 10]\n",
    "import json\nfrom pathlib import Path\n\n\n"
    "def load_config(path: Path) -> dict:\n"
    "    try:\n"
    "        data = json.loads(path.read_text(encoding='utf-8'))\n"
    "    except FileNotFoundError:\n"
    "        raise SystemExit(f'config {path} not found')\n"
    "    except json.JSONDecodeError as e:\n"
    "        raise SystemExit(f'{path}: line {e.lineno}: {e.msg}')\n"
    "    if not isinstance(data, dict):\n"
    "        raise SystemExit(f'{path}: expected an object')\n"
    "    return {k.lower(): v for k, v in data.items()}\n",
    "class LRUCache:\n"
    "    def __init__(self, capacity: int):\n"
    "        self.capacity = capacity\n"
    "        self.items: dict = {}\n\n"
    "    def get(self, key):\n"
    "        if key not in self.items:\n"
    "            return None\n"
    "        value = self.items.pop(key)\n"
    "        self.items[key] = value  # most recently used goes last\n"
    "        return value\n\n"
    "    def put(self, key, value) -> None:\n"
    "        self.items.pop(key, None)\n"
    "        self.items[key] = value\n"
    "        if len(self.items) > self.capacity:\n"
    "            self.items.pop(next(iter(self.items)))\n",
    "async function fetchUsers(api, page = 1) {\n"
    "  const res = await fetch(`${api}/users?page=${page}`, {\n"
    "    headers: { Accept: 'application/json' },\n"
    "  });\n"
    "  if (!res.ok) {\n"
    "    throw new Error(`HTTP ${res.status}: ${res.statusText}`);\n"
    "  }\n"
    "  const { users, next } = await res.json();\n"
    "  return next ? users.concat(await fetchUsers(api, page + 1)) : users;\n"
    "}\n\n"
    "fetchUsers('https://example.org/api').then((u) => console.log(u.length, 'users'));\n",
    "#include <stdio.h>\n#include <stdlib.h>\n\n"
    "/* Read integers from stdin and print their mean and maximum. */\n"
    "int main(void) {\n"
    "    long sum = 0, max = 0, n = 0, x;\n"
    '    while (scanf("%ld", &x) == 1) {\n'
    "        sum += x;\n"
    "        if (n == 0 || x > max) max = x;\n"
    "        n++;\n"
    "    }\n"
    '    if (n == 0) { fprintf(stderr, "no input\\n"); return EXIT_FAILURE; }\n'
    '    printf("mean=%.3f max=%ld\\n", (double)sum / n, max);\n'
    "    return EXIT_SUCCESS;\n"
    "}\n",
    "SELECT c.name, COUNT(o.id) AS orders, SUM(o.total) AS revenue\n"
    "FROM customers AS c\n"
    "JOIN orders AS o ON o.customer_id = c.id\n"
    "WHERE o.created_at >= DATE '2024-01-01'\n"
    "  AND o.status <> 'cancelled'\n"
    "GROUP BY c.name\n"
    "HAVING SUM(o.total) > 1000\n"
    "ORDER BY revenue DESC\n"
    "LIMIT 20;\n",
    "#!/usr/bin/env bash\nset -euo pipefail\n\n"
    "# Back up every PostgreSQL database into a dated, compressed file and keep the last 14 days.\n"
    'backup_dir="/var/backups/pg/$(date +%F)"\n'
    'mkdir -p "$backup_dir"\n'
    "for db in $(psql -At -c 'SELECT datname FROM pg_database WHERE NOT datistemplate'); do\n"
    '  pg_dump "$db" | gzip -9 > "$backup_dir/$db.sql.gz"\n'
    "done\n"
    "find /var/backups/pg -mindepth 1 -maxdepth 1 -type d -mtime +14 -exec rm -rf {} +\n",
    "fn word_counts(text: &str) -> std::collections::HashMap<String, usize> {\n"
    "    let mut counts = std::collections::HashMap::new();\n"
    "    for word in text.split_whitespace() {\n"
    "        let w = word.trim_matches(|c: char| !c.is_alphanumeric()).to_lowercase();\n"
    "        if !w.is_empty() {\n"
    "            *counts.entry(w).or_insert(0) += 1;\n"
    "        }\n"
    "    }\n"
    "    counts\n"
    "}\n",
    "import torch\nimport torch.nn as nn\n\n\n"
    "class RMSNorm(nn.Module):\n"
    "    def __init__(self, dim: int, eps: float = 1e-6):\n"
    "        super().__init__()\n"
    "        self.eps = eps\n"
    "        self.weight = nn.Parameter(torch.ones(dim))\n\n"
    "    def forward(self, x: torch.Tensor) -> torch.Tensor:\n"
    "        var = x.float().pow(2).mean(-1, keepdim=True)\n"
    "        return (x.float() * torch.rsqrt(var + self.eps)).to(x.dtype) * self.weight\n",
    '{\n  "name": "inventory-service",\n  "version": "2.3.1",\n  "port": 8080,\n'
    '  "database": {"host": "db.internal", "pool_size": 20, "timeout_ms": 5000},\n'
    '  "features": ["audit-log", "bulk-import", "webhooks"],\n'
    '  "limits": {"max_items_per_request": 500, "rate_per_minute": 1200}\n}\n',
    '<!DOCTYPE html>\n<html lang="en">\n<head>\n  <meta charset="utf-8">\n  <title>Order summary</title>\n'
    "</head>\n<body>\n  <h1>Thank you for your order</h1>\n  <table>\n"
    "    <tr><th>Item</th><th>Qty</th><th>Price</th></tr>\n"
    "    <tr><td>Notebook</td><td>3</td><td>$4.50</td></tr>\n"
    "    <tr><td>Pen set</td><td>1</td><td>$12.00</td></tr>\n  </table>\n</body>\n</html>\n",
    # Maths, tables, mixed
    "Let f(x) = x^3 - 6x^2 + 11x - 6. Since f(1) = 1 - 6 + 11 - 6 = 0, x - 1 is a factor, and polynomial division "
    "gives f(x) = (x - 1)(x^2 - 5x + 6) = (x - 1)(x - 2)(x - 3). The derivative f'(x) = 3x^2 - 12x + 11 vanishes at "
    "x = 2 ± 1/sqrt(3), so f has a local maximum near x = 1.42 and a local minimum near x = 2.58. The integral of "
    "f from 1 to 3 is zero by symmetry about x = 2.",
    "| City | Population (millions) | Area (km²) |\n| --- | --- | --- |\n| Tokyo | 37.1 | 2,194 |\n"
    "| Delhi | 33.8 | 1,484 |\n| Shanghai | 29.9 | 6,341 |\n| São Paulo | 22.8 | 1,521 |\n"
    "| Mexico City | 22.5 | 1,485 |\nThe figures refer to urban agglomerations and are rounded estimates.",
    "Release notes, version 4.2.0: added support for resumable uploads larger than 5 GB; fixed a race condition "
    "that could corrupt the index when two writers committed at the same time (issue #1187); the --dry-run flag now "
    "prints the exact list of files that would be deleted; Python 3.8 is no longer supported; the default timeout "
    "rose from 30 to 60 seconds. Upgrade with: pip install --upgrade syncer==4.2.0.",
    "混合语言示例：We deployed the model on 3 GPUs（每张 80 GB 显存），batch size 设为 16，平均延迟 120 ms。"
    "After switching to 4-bit GPTQ weights, memory dropped from 14.2 GB to 4.1 GB per replica, "
    "而准确率只下降了 0.4 个百分点，so we kept the quantized version in production.",
)
