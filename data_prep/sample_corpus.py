"""The project's small multilingual sample corpus: sentences written for megatron_bloom, in ten natural
languages (five scripts) and two programming languages, combined into documents deterministically.

    python -m data_prep.sample_corpus --output data_prep/sample_corpus.jsonl --documents 1200

`data_prep/sample_corpus.jsonl` (shipped) was made with the defaults; tests, the quickstart and the
benchmarks use it or make larger corpora with `generate_documents`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Dict, List

SENTENCES: Dict[str, List[str]] = {
    "en": [
        "The river was higher than usual after three days of rain.",
        "She kept a notebook of every bird she saw on the way to work.",
        "Our train left the station twelve minutes late this morning.",
        "A good map shows the roads, but a good guide shows the shortcuts.",
        "The library opens at nine and closes when the last reader leaves.",
        "He repaired the old radio with parts from a broken television.",
        "Farmers in the valley grow apples, pears and a little barley.",
        "The committee will publish its report at the end of the month.",
        "Children learned to count by sorting shells on the beach.",
        "Nobody remembered who had planted the tall tree by the gate.",
        "Bread tastes better when it is shared with friends.",
        "The lighthouse keeper wrote letters that nobody ever answered.",
    ],
    "fr": [
        "Le marché du samedi attire des gens de tous les villages voisins.",
        "Elle a appris à jouer du violon pendant un hiver très long.",
        "Les nuages ont caché la montagne toute la matinée.",
        "Il faut arroser les tomates le soir, quand il fait plus frais.",
        "La boulangerie du coin ouvre avant le lever du soleil.",
        "Nous avons traversé le pont à pied pour voir le fleuve.",
        "Le musée expose des outils anciens trouvés dans la région.",
        "Son grand-père racontait des histoires de marins et de tempêtes.",
        "Les élèves ont préparé une pièce de théâtre pour la fête.",
        "Une lettre inattendue est arrivée par la poste ce matin.",
    ],
    "es": [
        "La plaza se llena de música cuando empieza el verano.",
        "Mi abuela guarda las recetas de la familia en una caja de madera.",
        "El autobús sube la colina despacio, pero nunca se detiene.",
        "Los pescadores salen al mar antes de que amanezca.",
        "Aprendimos a cultivar maíz y frijoles en el huerto de la escuela.",
        "La biblioteca del pueblo tiene más libros que habitantes.",
        "Después de la tormenta, el cielo quedó limpio y brillante.",
        "El mercado vende frutas que no se encuentran en la ciudad.",
        "Ella escribió una carta larga a su hermano que vive lejos.",
        "Los niños corrieron hasta el río para ver los patos.",
    ],
    "de": [
        "Der Zug nach Norden fährt jeden Morgen um sieben Uhr ab.",
        "Im Garten wachsen Kartoffeln, Bohnen und ein paar Sonnenblumen.",
        "Die alte Brücke wurde im letzten Sommer neu gestrichen.",
        "Sie liest jeden Abend ein Kapitel aus einem dicken Roman.",
        "Nach dem Regen roch der Wald nach Moos und feuchter Erde.",
        "Der Bäcker kennt die Namen aller Kinder in der Straße.",
        "Wir haben das Zelt am Ufer des kleinen Sees aufgebaut.",
        "Die Bibliothek sammelt Briefe aus drei Jahrhunderten.",
        "Ein kalter Wind wehte über die leeren Felder.",
        "Am Wochenende reparieren sie gemeinsam das Fahrrad.",
    ],
    "pt": [
        "O barco atravessou o rio devagar, carregado de frutas.",
        "Na feira de domingo há sempre música e pastel quente.",
        "Ela plantou uma mangueira no quintal quando era criança.",
        "A chuva da tarde refrescou a cidade inteira.",
        "Os estudantes organizaram uma biblioteca na escola do bairro.",
        "Meu tio conhece todas as estrelas pelo nome.",
        "O café da manhã tinha pão, queijo e suco de laranja.",
        "A estrada de terra leva até uma praia quase deserta.",
        "Eles cantaram juntos até a última luz se apagar.",
        "A carta chegou com três selos e um desenho de pássaro.",
    ],
    "zh": [
        "早上的公园里有很多人在打太极拳。",
        "她每天晚上都会读半个小时的书。",
        "这条河流经三个城市，最后流入大海。",
        "我们在山顶上看到了美丽的日出。",
        "奶奶做的饺子是全家人最喜欢的。",
        "图书馆新到了一批关于天文的书。",
        "雨停以后，街道变得非常干净。",
        "孩子们在学校的花园里种了向日葵。",
        "火车穿过长长的隧道，进入了山谷。",
        "他用旧木头做了一张结实的桌子。",
    ],
    "ar": [
        "يفتح السوق القديم أبوابه في الصباح الباكر.",
        "قرأت الطالبة كتابا عن تاريخ المدينة.",
        "هطل المطر طوال الليل فامتلأت الشوارع بالماء.",
        "يزرع الفلاحون القمح والشعير في السهل الواسع.",
        "جلس الأصدقاء في المقهى يتحدثون عن السفر.",
        "تطير الطيور جنوبا عندما يقترب الشتاء.",
        "كتب الجد رسالة طويلة إلى حفيده.",
        "المكتبة العامة مفتوحة لجميع سكان الحي.",
        "أعدت الأم خبزا ساخنا لوجبة الإفطار.",
        "يمر القطار بجانب النهر قبل أن يصل إلى المحطة.",
    ],
    "hi": [
        "सुबह की धूप में बगीचा बहुत सुंदर लगता है।",
        "बच्चे नदी के किनारे खेल रहे थे।",
        "दादी हर शाम हमें पुरानी कहानियाँ सुनाती हैं।",
        "बाज़ार में ताज़े आम और केले बिक रहे हैं।",
        "हमने पहाड़ पर चढ़कर सूर्योदय देखा।",
        "पुस्तकालय में नई किताबें आई हैं।",
        "बारिश के बाद हवा ठंडी हो गई।",
        "किसान खेत में गेहूँ बो रहे हैं।",
        "रेलगाड़ी स्टेशन पर समय से पहुँची।",
        "उसने अपने मित्र को एक लंबा पत्र लिखा।",
    ],
    "sw": [
        "Watoto walicheza mpira uwanjani baada ya shule.",
        "Soko la samaki hufunguliwa mapema asubuhi.",
        "Mvua kubwa ilinyesha usiku mzima kijijini.",
        "Bibi alipika wali na maharage kwa chakula cha jioni.",
        "Tulipanda mlima na kuona ziwa kubwa chini yake.",
        "Maktaba mpya ina vitabu vingi vya hadithi.",
        "Mkulima alivuna mahindi mengi mwaka huu.",
        "Treni ilifika kituoni kwa wakati.",
        "Ndege wengi huhamia kusini wakati wa baridi.",
        "Aliandika barua ndefu kwa rafiki yake.",
    ],
    "vi": [
        "Buổi sáng, chợ quê đông người mua bán.",
        "Bà tôi thường kể chuyện cổ tích vào buổi tối.",
        "Con sông chảy qua cánh đồng lúa xanh mướt.",
        "Chúng tôi leo núi để ngắm bình minh.",
        "Thư viện trường vừa có thêm nhiều sách mới.",
        "Sau cơn mưa, bầu trời trở nên trong xanh.",
        "Người nông dân đang gặt lúa trên cánh đồng.",
        "Chiếc thuyền nhỏ chở đầy trái cây ra chợ.",
        "Em bé cười khi nhìn thấy đàn vịt.",
        "Anh ấy viết một lá thư dài cho gia đình.",
    ],
    "code_python": [
        "def mean(values):\n    return sum(values) / len(values)\n",
        "for index, name in enumerate(names):\n    print(index, name)\n",
        "counts = {}\nfor word in text.split():\n    counts[word] = counts.get(word, 0) + 1\n",
        "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n",
        "with open(path) as handle:\n    lines = [line.strip() for line in handle]\n",
        "squares = [n * n for n in range(10) if n % 2 == 0]\n",
    ],
    "code_javascript": [
        "function add(a, b) {\n  return a + b;\n}\n",
        "const names = users.map((user) => user.name);\n",
        "for (let i = 0; i < items.length; i++) {\n  console.log(items[i]);\n}\n",
        "const total = prices.reduce((sum, price) => sum + price, 0);\n",
        "document.querySelector('#title').textContent = 'Hello';\n",
        "if (count > 10) {\n  warn('too many');\n} else {\n  count += 1;\n}\n",
    ],
}


def generate_documents(count: int, seed: int = 0, max_sentences: int = 8) -> List[dict]:
    """`count` documents `{"text", "lang"}`: 1 to `max_sentences` sentences of one language each."""
    rng = random.Random(seed)
    languages = sorted(SENTENCES)
    documents = []
    for _ in range(count):
        language = rng.choice(languages)
        sentences = rng.choices(SENTENCES[language], k=rng.randint(1, max_sentences))
        separator = "" if language == "zh" or language.startswith("code") else " "
        documents.append({"text": separator.join(sentences), "lang": language})
    return documents


def write_jsonl(documents: List[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as handle:
        for document in documents:
            handle.write(json.dumps(document, ensure_ascii=False) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", type=Path, default=Path(__file__).with_name("sample_corpus.jsonl"))
    parser.add_argument("--documents", type=int, default=1200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    write_jsonl(generate_documents(args.documents, args.seed), args.output)


if __name__ == "__main__":
    main()
