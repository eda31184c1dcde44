"""Handwritten Nynorsk, North Sámi, English and held-out documents for the bundled corpus
(original text written for this project)."""

NN_DOCS = [
    "Nynorsk er det eine av dei to offisielle skriftspråka i Noreg. Ivar Aasen reiste rundt i landet på "
    "1840-talet og samla inn ord og former frå dialektane. Ut frå dette laga han eit skriftspråk som han "
    "kalla landsmål. I dag bruker om lag ein av ti elevar nynorsk som hovudmål, og dei fleste av dei bur på "
    "Vestlandet.",

    "Det regna heile natta, og om morgonen låg skodda tett over fjorden. Då vi gjekk ut, høyrde vi berre "
    "måsane og bølgjene mot berget. Utpå dagen letta skodda, og fjella kom fram, eitt etter eitt.",

    "Garden ligg høgt oppe i lia, med utsikt over fjorden. Om sommaren går sauene på beite i fjellet, og om "
    "hausten må dei sankast inn att. Då kjem naboar og vener for å hjelpe til, og etter sankinga et alle "
    "saman.",

    "Hardanger er kjend for fruktdyrkinga. Om våren blømer tusenvis av frukttre langs fjorden, og mange "
    "reiser dit berre for å sjå det. Om hausten blir epla og morellane selde, og mykje av frukta blir til "
    "saft og sider.",

    "Eg vaks opp på ei lita øy utanfor kysten. Vi tok ferja til skulen kvar morgon, og om vinteren hende det "
    "at ho ikkje gjekk på grunn av stormen. Då hadde vi fri, og vi sprang ned til sjøen for å sjå på dei "
    "store bølgjene.",

    "Bergensbanen går over Hardangervidda, den største fjellvidda i Nord-Europa. Toget stig frå Oslo gjennom "
    "skog og dalar før det kjem opp over tregrensa. På Finse, den høgaste stasjonen, ligg snøen ofte til "
    "langt ut i juni.",

    "Vinteren er lang i fjellbygdene. Snøen kjem gjerne i oktober og blir liggjande til mai. Born lærer å gå "
    "på ski nesten før dei kan gå, og mange går på ski til skulen når vegen er dekt av snø.",

    "Sola er ei stjerne, og ho er berre ei av milliardar stjerner i galaksen vår. Lyset frå sola bruker om "
    "lag åtte minutt på å nå jorda. Utan energien frå sola ville det ikkje vore liv her.",

    "I går var eg på marknad i byen. Det var mykje folk der, og dei selde alt frå fisk og grønsaker til "
    "strikka vottar og heimelaga syltetøy. Eg kjøpte ein pose eple og ei krukke honning.",

    "Hei Olav!\n\nTakk for brevet ditt. Her har det vore kaldt og klårt heile veka, og vi har gått mykje på "
    "ski.\n\nNeste helg kjem tante Sigrid på besøk. Kanskje du vil kome du òg?\n\nHelsing Kari",

    "Stavkyrkjene er blant dei eldste trebygningane i verda. Dei vart bygde i mellomalderen, og i dag står "
    "det att om lag tjueåtte av dei i Noreg. Urnes stavkyrkje i Luster er på UNESCO si verdsarvliste.",

    "Fjellet var kvitt av snø, men sola varma godt i lia. Vi sette oss på ein stein og åt matpakka medan vi "
    "såg utover dalen. Ein ørn sirkla høgt over oss, og langt nede kunne vi sjå elva som glitra i sola.",
]

# Simple North Sámi sentences written by a non-native writer; see the corpus README.
SE_DOCS = [
    "Bures! Mu namma lea Ánde. Mun orun Guovdageainnus. Mun hálan sámegiela ja dárogiela.",
    "Odne lea galmmas. Muohttá ja biegga bossu. Mánát leat skuvllas.",
    "Áhkku orru Kárášjogas. Son vuoššá gáfe. Mun juhkan gáfe ja borran guoli.",
    "Buorre idit! Odne lea bearjadat. Ihttin lea lávvordat.",
    "Boazu borrá jeahkála. Bohccot leat duoddaris. Dálvi lea guhkki ja galmmas.",
    "Beaivváš báitá. Odne lea bivval. Mánát stohket olgun.",
    "Mus lea oabbá ja viellja. Áhčči bargá meahcis. Eadni bargá skuvllas.",
    "Guolli vuodjá jogas. Deatnu lea stuorra johka. Čáhci lea čoaskkis.",
    "Mun lohkan girjji. Sámegiella lea čáppa giella. Min giella lea dehálaš.",
    "Sámediggi lea Kárášjogas. Guovdageaidnu lea Finnmárkkus.",
    "Dálvet lea sevdnjes. Geasset lea čuovgat. Mun liikon dálvái.",
    "Guovža oađđá dálvet. Loddi lávlu. Jávri lea jikŋon.",
    "Mun vázzán skuvlii. Skuvla álgá borgemánus.",
    "Gos don orut? Mun orun Romssas. Mun boađán Kárášjogas.",
    "Buorre beaivi! Mun lean váiban. Mun dárbbašan veahki.",
    "Sámi álbmotbeaivi lea guovvamánu 6. beaivvi.",
    "Ikte eahkes ledje guovssahasat almmis. Odne arvá.",
    "Mun čálán reivve áhkkui. Giitu ollu!",
    "Buorre eahket! Mana dearvan!",
    "Juovlamánus lea sevdnjes. Ođđajagemánnu lea galmmas mánnu.",
]

EN_DOCS = [
    "Norway is a long and narrow country in northern Europe. Most people live along the coast and in the "
    "valleys of the south-east. The coastline is deeply cut by fjords, and if you counted every bay and "
    "island, it would be many times longer than the distance from the southern tip to the Russian border.",

    "The Norwegian language has two written standards, Bokmål and Nynorsk. They are close enough that "
    "readers of one can read the other, but many common words are spelled differently. In addition, "
    "several Sámi languages are spoken in the north, and North Sámi is the largest of them.",

    "A language model learns to predict the next token in a text. During training it reads a very large "
    "amount of text and gradually adjusts millions or billions of numbers, its parameters, so that its "
    "predictions get better. A model with a long context can take many pages of text into account at once.",

    "The weather on the west coast changes quickly. A sunny morning can turn into a grey and rainy "
    "afternoon, and the wind from the sea can be strong. People who live there learn to carry a rain "
    "jacket everywhere, even in summer.",

    "In winter the north of Norway gets very little daylight. In Tromsø the sun stays below the horizon for "
    "about two months. The period is called the polar night, but it is not completely dark: around noon the "
    "sky turns deep blue, and on clear nights the northern lights often dance overhead.",

    "Reindeer herding is an important part of Sámi culture. The herds move between winter pastures on the "
    "inland plateau and summer pastures near the coast. Today herders use snowmobiles, GPS collars and "
    "drones, but the yearly rhythm of the migration is very old.",

    "Dear Anna,\n\nThank you for your letter. We arrived in Bergen on Tuesday, and it has rained every day "
    "since. Still, the city is beautiful, and the fish market is wonderful.\n\nTomorrow we take the train "
    "to Oslo. I will write again from there.\n\nBest wishes,\nTom",

    "Water boils at one hundred degrees Celsius at sea level, but at lower temperatures high up in the "
    "mountains, because the air pressure is lower there. That is why it takes longer to cook pasta on a "
    "mountain top.",

    "Shopping list:\n- bread\n- milk\n- apples\n- coffee\n\nRemember the library books!",

    "The Vikings were skilled shipbuilders. Their long, narrow ships could sail on the open sea and still "
    "go far up shallow rivers. Several well-preserved ships have been found in burial mounds near the Oslo "
    "fjord.",

    "Every spring, millions of birds fly north to breed. They use the long days of the Arctic summer to find "
    "food for their chicks. In autumn they fly south again, some of them all the way to Africa.",

    "Hydropower provides almost all of Norway's electricity. Rain and melting snow fill reservoirs in the "
    "mountains, and the water runs through turbines on its way down to the sea.",
]

HELDOUT_DOCS = [
    "Drammen ligger ved elva Drammenselva, ikke langt fra Oslo. For noen tiår siden var elva sterkt "
    "forurenset, men etter en stor opprydning kan man i dag bade og fiske laks midt i byen. Den nye "
    "elvepromenaden har blitt et populært sted å gå tur.",

    "Det blåste kraftig hele natta, og flere trær veltet over veien. Om morgenen var strømmen borte i store "
    "deler av kommunen. Mannskaper jobbet hele dagen med å rydde veiene, og ved kveldstid var de fleste "
    "husstandene tilkoblet igjen.",

    "Ekornet samler nøtter og kongler om høsten og gjemmer dem på mange forskjellige steder. Det husker ikke "
    "alle gjemmestedene, og noen av nøttene spirer og blir til nye trær. Slik hjelper ekornet skogen med å "
    "spre seg.",

    "– Har du sett nøklene mine?\n– Sjekk lomma på jakka di.\n– Der var de! Takk skal du ha.",

    "Morgonen var stille og kald. Rimet låg kvitt over bøen, og røyken steig rett opp frå pipene i bygda.",

    "The first snow usually falls in the mountains in September. By November the high roads are often "
    "closed, and they do not open again until late spring.",
]
