"""Writes the bundled corpus (the .jsonl files next to this script); run once, the files are committed.

    python training/corpus/make_corpus.py

Inside: templated Bokmål and Nynorsk weather forecasts and diary entries (fixed seed, so the output is
the same on every run), the English-Bokmål translation pairs, and the writer that puts them together
with the handwritten documents of texts_nb.py and texts_other.py. Templates pick whole clauses per
season, so every sentence stays grammatical and a forecast never mixes snow with a heatwave.
"""

from __future__ import annotations

import json
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from texts_nb import DOCS as NB_DOCS  # noqa: E402
from texts_other import EN_DOCS, HELDOUT_DOCS, NN_DOCS, SE_DOCS  # noqa: E402

CITIES = ["Oslo", "Bergen", "Trondheim", "Stavanger", "Tromsø", "Bodø", "Kristiansand", "Ålesund",
          "Drammen", "Fredrikstad", "Hamar", "Lillehammer", "Molde", "Narvik", "Alta", "Hammerfest",
          "Kirkenes", "Harstad", "Gjøvik", "Arendal", "Haugesund", "Førde", "Røros", "Skien",
          "Karasjok", "Kautokeino", "Vadsø", "Mo i Rana", "Steinkjer", "Lillesand"]
DAYS_NB = ["mandag", "tirsdag", "onsdag", "torsdag", "fredag", "lørdag", "søndag"]
DAYS_NN = ["måndag", "tysdag", "onsdag", "torsdag", "fredag", "laurdag", "søndag"]
DIRECTIONS_NB = ["nord", "sør", "øst", "vest", "nordvest", "sørvest", "nordøst", "sørøst"]
DIRECTIONS_NN = ["nord", "sør", "aust", "vest", "nordvest", "sørvest", "nordaust", "søraust"]

# Bokmål forecasts: (season, temperature range, morning clauses, changes, advice).
NB_SEASONS = {
    "vinter": ((-18, 2),
               ["klarvær og streng kulde", "lett snøfall", "tett snødrev på fjellet", "skyet vær og grått lys"],
               ["kommer det mer snø fra vest", "letter skydekket, og det blir kaldere", "løyer vinden",
                "går snøen over til sludd ved kysten"],
               ["Kjør forsiktig, det kan være glatt på veiene.", "Kle deg godt, og husk lue og votter.",
                "Det er fine forhold for ski i lysløypa.", "Strø trappa før du går ut."]),
    "vår": ((-2, 14),
            ["sol og lett frost", "yr og tåke i lavlandet", "skiftende skydekke", "regnbyger fra havet"],
            ["blir det oppholdsvær og noe sol", "øker vinden på", "kommer det nye regnbyger",
             "blir det mildt i le for vinden"],
            ["Ta med en ekstra genser, det er kjølig i skyggen.", "Husk paraply hvis du skal ut.",
             "Det er fint turvær, så ta gjerne en tur ut.", "Veiene kan være glatte tidlig om morgenen."]),
    "sommer": ((9, 29),
               ["sol fra skyfri himmel", "lett skydekke og svak vind", "tåke langs kysten",
                "varme og høy luftfuktighet"],
               ["kan det bli regnbyger og torden i innlandet", "blir det mer skyet fra vest",
                "holder det seg tørt og varmt", "frisker vinden på ute ved havet"],
               ["Husk solkrem og nok vann.", "Det er fint badevær ved strendene.",
                "Ta med en jakke til kvelden, det blir kjøligere.", "Pass på bålforbudet i skog og mark."]),
    "høst": ((-3, 13),
             ["grått vær og regn", "rim på bakken og klar luft", "tåke i dalene", "kraftig vind fra havet"],
             ["kommer det mer regn", "blir det opphold og noe sol", "øker vinden til liten kuling",
              "faller temperaturen raskt"],
             ["Husk regntøy og gode sko.", "Skift til vinterdekk hvis du skal over fjellet.",
              "Det er fint soppvær i skogen.", "Bind fast løse ting på verandaen."]),
}
NB_WIND = ["svak vind", "laber bris", "frisk bris", "liten kuling", "stiv kuling"]

# Nynorsk forecasts, same structure.
NN_SEASONS = {
    "vinter": ((-18, 2),
               ["klårvêr og sterk kulde", "lett snøfall", "tett snøfokk på fjellet", "skya vêr og grått lys"],
               ["kjem det meir snø frå vest", "lettar skydekket, og det blir kaldare", "løyer vinden",
                "går snøen over til sludd ved kysten"],
               ["Køyr forsiktig, det kan vere glatt på vegane.", "Kle deg godt, og hugs lue og vottar.",
                "Det er fint skiføre i lysløypa."]),
    "vår": ((-2, 14),
            ["sol og lett frost", "yr og skodde i låglandet", "skiftande skydekke", "yr og regn frå havet"],
            ["blir det opphaldsvêr og noko sol", "aukar vinden på", "kjem det regn att"],
            ["Ta med ein ekstra genser, det er kjølig i skuggen.", "Hugs paraply om du skal ut.",
             "Det er fint turvêr, så ta gjerne ein tur ut."]),
    "sommar": ((9, 29),
               ["sol frå skyfri himmel", "lett skydekke og svak vind", "skodde langs kysten"],
               ["kan det bli torevêr i innlandet", "blir det meir skya frå vest",
                "held det seg tørt og varmt"],
               ["Hugs solkrem og nok vatn.", "Det er fint badevêr ved strendene.",
                "Ta med ei jakke til kvelden, det blir kjøligare."]),
    "haust": ((-3, 13),
              ["grått vêr og regn", "rim på bakken og klår luft", "skodde i dalane"],
              ["kjem det meir regn", "blir det opphald og noko sol", "aukar vinden til liten kuling"],
              ["Hugs regntøy og gode sko.", "Skift til vinterdekk om du skal over fjellet."]),
}
NN_WIND = ["svak vind", "lett bris", "frisk bris", "liten kuling"]


def _degrees(n: int, minus: str) -> str:
    return f"{minus} {-n}" if n < 0 else str(n)


def nb_forecast(rng: random.Random) -> str:
    season = rng.choice(list(NB_SEASONS))
    (low, high), mornings, changes, advice = NB_SEASONS[season]
    lo = rng.randint(low, high - 4)
    hi = rng.randint(lo + 2, min(lo + 9, high))
    city, day = rng.choice(CITIES), rng.choice(DAYS_NB + ["i morgen", "i dag"])
    opening = rng.choice([f"Værmelding for {city} {day}.", f"Slik blir været i {city} {day}.",
                          f"Her er været for {city} {day}, en {season}dag."])
    return " ".join([
        opening,
        f"Dagen starter med {rng.choice(mornings)}.",
        f"Utover dagen {rng.choice(changes)}.",
        f"Temperaturen ligger mellom {_degrees(lo, 'minus')} og {_degrees(hi, 'minus')} grader.",
        f"Det blåser {rng.choice(NB_WIND)} fra {rng.choice(DIRECTIONS_NB)}.",
        rng.choice(advice),
    ])


def nn_forecast(rng: random.Random) -> str:
    season = rng.choice(list(NN_SEASONS))
    (low, high), mornings, changes, advice = NN_SEASONS[season]
    lo = rng.randint(low, high - 4)
    hi = rng.randint(lo + 2, min(lo + 9, high))
    city, day = rng.choice(CITIES), rng.choice(DAYS_NN + ["i morgon", "i dag"])
    return " ".join([
        rng.choice([f"Vêrmelding for {city} {day}.", f"Slik blir vêret i {city} {day}."]),
        f"Dagen startar med {rng.choice(mornings)}.",
        f"Utover dagen {rng.choice(changes)}.",
        f"Temperaturen ligg mellom {_degrees(lo, 'minus')} og {_degrees(hi, 'minus')} grader.",
        f"Det blæs {rng.choice(NN_WIND)} frå {rng.choice(DIRECTIONS_NN)}.",
        rng.choice(advice),
    ])


NAMES = {"hun": ["Kari", "Ingrid", "Sigrid", "Astrid", "Marit", "Ida", "Nora", "Sofie", "Ragnhild", "Elle"],
         "han": ["Ola", "Lars", "Nils", "Jonas", "Håkon", "Emil", "Magnus", "Sander", "Aslak", "Even"]}
TIMES = ["seks", "halv sju", "sju", "kvart over sju", "halv åtte", "åtte", "ni"]
BEDTIMES = ["ti", "halv elleve", "elleve", "halv tolv", "tolv"]
# (past tense verb, rest): "Først <verb> <pronoun> <rest>." keeps Norwegian verb-second order.
NB_ACTIVITIES = [
    ("drakk", "en kopp kaffe ved kjøkkenbordet"), ("gikk", "en tur med hunden langs elva"),
    ("handlet", "mat på butikken på hjørnet"), ("leste", "avisa på nettbrettet"),
    ("ringte", "til en gammel venn"), ("vasket", "klær og ryddet i stua"),
    ("syklet", "til byen for å hente en pakke"), ("jobbet", "med en rapport som skulle være ferdig før helgen"),
    ("svarte", "på e-poster"), ("trente", "på treningssenteret"), ("bakte", "boller til kaffen"),
    ("spilte", "fotball med noen venner i parken"), ("lånte", "to bøker på biblioteket"),
    ("hjalp", "naboen med å bære en sofa"), ("skrev", "et langt brev"), ("så", "på nyhetene"),
    ("strikket", "videre på en genser"), ("lekte", "med barna i hagen"),
    ("reparerte", "sykkelen som hadde fått punktering"), ("planla", "sommerferien"),
    ("tok", "bussen til svømmehallen"), ("øvde", "på gitaren en stund"),
]
NB_MEALS = ["fiskesuppe", "kjøttkaker med brun saus", "pasta med tomatsaus", "laks med poteter og brokkoli",
            "taco", "grønnsakssuppe", "pizza", "fårikål", "omelett med sopp", "kyllinggryte med ris"]
NB_MOODS = ["Det hadde vært en fin dag.", "Det hadde vært en lang dag.", "Dagen hadde gått fort.",
            "Alt i alt var det en rolig dag."]

NN_ACTIVITIES = [
    ("drakk", "ein kopp kaffi ved kjøkenbordet"), ("gjekk", "ein tur med hunden langs elva"),
    ("handla", "mat på butikken på hjørnet"), ("las", "avisa på nettbrettet"),
    ("ringde", "til ein gamal ven"), ("vaska", "klede og rydda i stova"),
    ("sykla", "til byen for å hente ei pakke"), ("svara", "på e-postar"), ("baka", "bollar til kaffien"),
    ("spelte", "fotball med nokre vener i parken"), ("lånte", "to bøker på biblioteket"),
    ("hjelpte", "naboen med å bere ein sofa"), ("skreiv", "eit langt brev"), ("såg", "på nyheitene"),
    ("strikka", "vidare på ein genser"), ("leika", "med borna i hagen"), ("planla", "sommarferien"),
]
NN_MEALS = ["fiskesuppe", "kjøtkaker med brun saus", "pasta med tomatsaus", "laks med poteter",
            "grønsaksuppe", "pizza", "fårikål", "raspeballar"]
NN_PRONOUN = {"hun": "ho", "han": "han"}


def nb_diary(rng: random.Random) -> str:
    pron = rng.choice(["hun", "han"])
    name = rng.choice(NAMES[pron])
    a, b, c, d = rng.sample(NB_ACTIVITIES, 4)
    return " ".join([
        f"{name} våknet klokka {rng.choice(TIMES)} på {rng.choice(DAYS_NB)}.",
        f"Først {a[0]} {pron} {a[1]}.", f"Etterpå {b[0]} {pron} {b[1]}.",
        f"Om ettermiddagen {c[0]} {pron} {c[1]}.", f"Til middag lagde {pron} {rng.choice(NB_MEALS)}.",
        f"Om kvelden {d[0]} {pron} {d[1]}, og klokka {rng.choice(BEDTIMES)} la {pron} seg.",
        rng.choice(NB_MOODS),
    ])


def nn_diary(rng: random.Random) -> str:
    key = rng.choice(["hun", "han"])
    pron, name = NN_PRONOUN[key], rng.choice(NAMES[key])
    a, b, c = rng.sample(NN_ACTIVITIES, 3)
    return " ".join([
        f"{name} vakna klokka {rng.choice(TIMES)} på {rng.choice(DAYS_NN)}.",
        f"Først {a[0]} {pron} {a[1]}.", f"Etterpå {b[0]} {pron} {b[1]}.",
        f"Til middag laga {pron} {rng.choice(NN_MEALS)}.",
        f"Om kvelden {c[0]} {pron} {c[1]}, og klokka {rng.choice(BEDTIMES)} la {pron} seg.",
    ])


def nb_multi_forecast(rng: random.Random) -> str:
    """Several forecasts in one document, one paragraph each (documents with blank lines)."""
    return "\n\n".join(nb_forecast(rng) for _ in range(rng.randint(2, 4)))


PAIRS = [
    ("I am hungry.", "Jeg er sulten."),
    ("The weather is nice today.", "Været er fint i dag."),
    ("Where is the train station?", "Hvor er togstasjonen?"),
    ("Thank you for the food.", "Takk for maten."),
    ("It is raining.", "Det regner."),
    ("It is snowing.", "Det snør."),
    ("Good morning!", "God morgen!"),
    ("Good night!", "God natt!"),
    ("What is your name?", "Hva heter du?"),
    ("My name is Kari.", "Jeg heter Kari."),
    ("I live in Oslo.", "Jeg bor i Oslo."),
    ("Where do you live?", "Hvor bor du?"),
    ("I come from Bergen.", "Jeg kommer fra Bergen."),
    ("How are you?", "Hvordan har du det?"),
    ("I am fine, thanks.", "Jeg har det bra, takk."),
    ("Do you speak English?", "Snakker du engelsk?"),
    ("I speak a little Norwegian.", "Jeg snakker litt norsk."),
    ("I do not understand.", "Jeg forstår ikke."),
    ("Can you help me?", "Kan du hjelpe meg?"),
    ("How much does it cost?", "Hvor mye koster det?"),
    ("The shop is closed.", "Butikken er stengt."),
    ("The bus is late.", "Bussen er forsinket."),
    ("I am tired.", "Jeg er trøtt."),
    ("I am cold.", "Jeg fryser."),
    ("It is warm outside.", "Det er varmt ute."),
    ("It is cold outside.", "Det er kaldt ute."),
    ("The sun is shining.", "Sola skinner."),
    ("The wind is strong today.", "Vinden er sterk i dag."),
    ("I like coffee.", "Jeg liker kaffe."),
    ("I would like a cup of tea.", "Jeg vil gjerne ha en kopp te."),
    ("The water is cold.", "Vannet er kaldt."),
    ("We are going to the cabin.", "Vi skal på hytta."),
    ("She reads a book.", "Hun leser en bok."),
    ("He drinks water.", "Han drikker vann."),
    ("The children are playing outside.", "Barna leker ute."),
    ("The dog is sleeping.", "Hunden sover."),
    ("The cat is black.", "Katten er svart."),
    ("I have a brother and a sister.", "Jeg har en bror og en søster."),
    ("My mother works at a hospital.", "Moren min jobber på et sykehus."),
    ("My father is a teacher.", "Faren min er lærer."),
    ("We eat dinner at five.", "Vi spiser middag klokka fem."),
    ("The food is good.", "Maten er god."),
    ("I need help.", "Jeg trenger hjelp."),
    ("Call the police!", "Ring politiet!"),
    ("Where is the toilet?", "Hvor er toalettet?"),
    ("The house is red.", "Huset er rødt."),
    ("The car is new.", "Bilen er ny."),
    ("The road is slippery.", "Veien er glatt."),
    ("Drive carefully.", "Kjør forsiktig."),
    ("I walk to work.", "Jeg går til jobben."),
    ("She cycles to school.", "Hun sykler til skolen."),
    ("We take the train to Trondheim.", "Vi tar toget til Trondheim."),
    ("The boat leaves at eight.", "Båten går klokka åtte."),
    ("The museum opens at ten.", "Museet åpner klokka ti."),
    ("What time is it?", "Hva er klokka?"),
    ("It is three o'clock.", "Klokka er tre."),
    ("Today is Monday.", "I dag er det mandag."),
    ("Tomorrow is Saturday.", "I morgen er det lørdag."),
    ("I was at home yesterday.", "Jeg var hjemme i går."),
    ("We went for a walk in the forest.", "Vi gikk en tur i skogen."),
    ("The forest is quiet.", "Skogen er stille."),
    ("The mountain is high.", "Fjellet er høyt."),
    ("The lake is frozen.", "Innsjøen er frosset."),
    ("The river is wide.", "Elva er bred."),
    ("Fish swim in the sea.", "Fisk svømmer i havet."),
    ("Birds sing in the morning.", "Fuglene synger om morgenen."),
    ("I saw a moose.", "Jeg så en elg."),
    ("The northern lights are beautiful.", "Nordlyset er vakkert."),
    ("Winter is long in the north.", "Vinteren er lang i nord."),
    ("Summer is short.", "Sommeren er kort."),
    ("It gets dark early.", "Det blir mørkt tidlig."),
    ("The days are getting longer.", "Dagene blir lengre."),
    ("I like to ski.", "Jeg liker å gå på ski."),
    ("We go skiing on Sundays.", "Vi går på ski på søndager."),
    ("He plays football.", "Han spiller fotball."),
    ("She sings in a choir.", "Hun synger i kor."),
    ("They are my friends.", "De er vennene mine."),
    ("I miss you.", "Jeg savner deg."),
    ("See you tomorrow!", "Vi ses i morgen!"),
    ("Have a nice weekend!", "God helg!"),
    ("Happy birthday!", "Gratulerer med dagen!"),
    ("Merry Christmas!", "God jul!"),
    ("Welcome to Norway!", "Velkommen til Norge!"),
    ("The library is open.", "Biblioteket er åpent."),
    ("I am reading the newspaper.", "Jeg leser avisen."),
    ("The coffee is hot.", "Kaffen er varm."),
    ("The bread is fresh.", "Brødet er ferskt."),
    ("We need milk and eggs.", "Vi trenger melk og egg."),
    ("Can I pay by card?", "Kan jeg betale med kort?"),
    ("The doctor is busy.", "Legen er opptatt."),
    ("I have a headache.", "Jeg har vondt i hodet."),
    ("Open the window, please.", "Vær så snill og åpne vinduet."),
    ("Close the door.", "Lukk døra."),
    ("The key is on the table.", "Nøkkelen ligger på bordet."),
    ("My phone is broken.", "Telefonen min er ødelagt."),
    ("The computer is slow.", "Datamaskinen er treg."),
    ("I am learning Norwegian.", "Jeg lærer norsk."),
    ("Norwegian is not difficult.", "Norsk er ikke vanskelig."),
    ("Write your name here.", "Skriv navnet ditt her."),
    ("Read the text aloud.", "Les teksten høyt."),
    ("The teacher is kind.", "Læreren er snill."),
    ("The students are listening.", "Elevene hører etter."),
    ("The meeting starts at nine.", "Møtet begynner klokka ni."),
    ("I am working from home today.", "Jeg jobber hjemmefra i dag."),
    ("The office is on the third floor.", "Kontoret ligger i tredje etasje."),
    ("The train was full.", "Toget var fullt."),
    ("The flight was cancelled.", "Flyet ble innstilt."),
    ("We are staying at a hotel.", "Vi bor på et hotell."),
    ("The room is small but clean.", "Rommet er lite, men rent."),
    ("Breakfast is served at seven.", "Frokosten serveres klokka sju."),
    ("I would like the fish.", "Jeg vil gjerne ha fisken."),
    ("The soup is too salty.", "Suppa er for salt."),
    ("Can we have the bill?", "Kan vi få regningen?"),
    ("The children are asleep.", "Barna sover."),
    ("The baby is crying.", "Babyen gråter."),
    ("Grandmother bakes bread.", "Bestemor baker brød."),
    ("Grandfather tells stories.", "Bestefar forteller historier."),
    ("We visit them every summer.", "Vi besøker dem hver sommer."),
    ("The garden is full of flowers.", "Hagen er full av blomster."),
    ("The apples are ripe.", "Eplene er modne."),
    ("I pick berries in the forest.", "Jeg plukker bær i skogen."),
    ("The boat is in the harbour.", "Båten ligger i havna."),
    ("The fishermen go out early.", "Fiskerne drar ut tidlig."),
    ("The sea is calm today.", "Havet er rolig i dag."),
    ("A storm is coming.", "Det kommer en storm."),
    ("Stay inside tonight.", "Bli inne i kveld."),
    ("The power is out.", "Strømmen er borte."),
    ("Light a candle.", "Tenn et lys."),
    ("The fire is warm.", "Bålet er varmt."),
    ("We sleep in a tent.", "Vi sover i telt."),
    ("The path is steep.", "Stien er bratt."),
    ("The view is amazing.", "Utsikten er fantastisk."),
    ("Take a photo of us.", "Ta et bilde av oss."),
    ("I forgot my umbrella.", "Jeg glemte paraplyen min."),
    ("My shoes are wet.", "Skoene mine er våte."),
    ("Put on a warm sweater.", "Ta på deg en varm genser."),
    ("It is minus ten degrees.", "Det er minus ti grader."),
    ("The snow is deep.", "Snøen er dyp."),
    ("The ice is thin.", "Isen er tynn."),
    ("Spring is coming.", "Våren kommer."),
    ("The birds are back.", "Fuglene er tilbake."),
    ("The leaves are yellow.", "Bladene er gule."),
    ("Autumn is my favourite season.", "Høsten er min favorittårstid."),
    ("I love this city.", "Jeg elsker denne byen."),
    ("The streets are narrow.", "Gatene er smale."),
    ("The bridge is old.", "Brua er gammel."),
    ("The church is beautiful.", "Kirken er vakker."),
    ("Turn left at the corner.", "Ta til venstre ved hjørnet."),
    ("Go straight ahead.", "Gå rett fram."),
    ("It is not far.", "Det er ikke langt."),
    ("I am lost.", "Jeg har gått meg vill."),
    ("Do you have a map?", "Har du et kart?"),
    ("The ferry is late again.", "Ferja er forsinket igjen."),
]


def write_jsonl(path: str, texts: list[str]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for text in texts:
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")


def main() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    rng = random.Random(20240901)
    nb = list(NB_DOCS)
    nb += [nb_forecast(rng) for _ in range(220)]
    nb += [nb_multi_forecast(rng) for _ in range(40)]
    nb += [nb_diary(rng) for _ in range(220)]
    rng.shuffle(nb)
    nn = list(NN_DOCS) + [nn_forecast(rng) for _ in range(60)] + [nn_diary(rng) for _ in range(60)]
    rng.shuffle(nn)
    pairs = [f"Engelsk: {en}\nBokmål: {nb_}\n" for en, nb_ in PAIRS]
    assert len(set(PAIRS)) == len(PAIRS)
    for name, texts in [("nb.jsonl", nb), ("nn.jsonl", nn), ("se.jsonl", SE_DOCS), ("en.jsonl", EN_DOCS),
                        ("translation_pairs.jsonl", pairs), ("heldout.jsonl", HELDOUT_DOCS)]:
        write_jsonl(os.path.join(here, name), texts)
        print(f"{name}: {len(texts)} documents, {os.path.getsize(os.path.join(here, name)):,} bytes")


if __name__ == "__main__":
    main()
