"""Handwritten Norwegian Bokmål documents for the bundled corpus (original text written for this project)."""

DOCS = [
    # Cities
    "Oslo er hovedstaden i Norge og landets største by. Byen ligger innerst i Oslofjorden og er omgitt av "
    "skog og åser, som folk kaller Marka. Om vinteren kan man ta T-banen fra sentrum og gå på ski i løpet av "
    "en halvtime. Om sommeren bader mange på øyene i fjorden.\n\nI sentrum ligger Slottet, Stortinget og "
    "Nationaltheatret nær hverandre langs Karl Johans gate. Operahuset i Bjørvika er bygget slik at man kan "
    "gå på taket, og derfra ser man utover fjorden og den nye bydelen rundt.",

    "Bergen ligger på Vestlandet, mellom sju fjell, og er kjent for å være en av de mest regnfulle byene i "
    "Europa. Mange bergensere sier at det ikke finnes dårlig vær, bare dårlige klær. Bryggen, med de gamle "
    "trehusene langs havna, minner om tiden da tyske kjøpmenn fra Hansaforbundet drev handel med tørrfisk "
    "her.\n\nFra sentrum går Fløibanen opp til Fløyen. På klare dager kan man se langt ut mot havet og "
    "øyene i vest.",

    "Trondheim ble grunnlagt for over tusen år siden og het lenge Nidaros. Nidarosdomen, som ble bygget over "
    "graven til Olav den hellige, er Nordens største middelalderkatedral. I dag er Trondheim en studentby, "
    "og universitetet preger livet i byen. Langs Nidelva står de fargerike bryggene på rad, og Gamle Bybro "
    "kalles ofte Lykkens portal.",

    "Tromsø ligger langt nord for polarsirkelen. Fra slutten av november til midten av januar kommer ikke "
    "sola over horisonten, og denne tiden kalles mørketida. Likevel er det ikke helt mørkt midt på dagen: "
    "himmelen får et blått lys som mange synes er vakkert. Om sommeren er det motsatt, da går ikke sola ned "
    "på flere uker.\n\nIshavskatedralen, med sin spisse, hvite form, er et av byens kjennetegn. Mange "
    "turister kommer til Tromsø om vinteren for å se nordlyset.",

    "Stavanger har vokst mye siden det ble funnet olje i Nordsjøen på slutten av 1960-tallet. Byen er "
    "fortsatt et senter for energinæringen, men gamlebyen med sine små, hvite trehus er godt bevart. Ikke "
    "langt fra byen ligger Preikestolen, en fjellhylle som stuper rett ned i Lysefjorden. Turen opp tar noen "
    "timer, og utsikten er verdt strevet.",

    "Kárášjohka, eller Karasjok på norsk, er et viktig senter for samisk kultur og politikk. Her ligger "
    "Sametinget, som ble åpnet i 1989. Guovdageaidnu, eller Kautokeino, ligger lenger vest på "
    "Finnmarksvidda. I begge kommunene snakker de fleste innbyggerne nordsamisk, og reindrift er fortsatt en "
    "viktig næring. Om våren flytter reinflokkene fra vinterbeitet på vidda ut mot kysten, der de beiter om "
    "sommeren.",

    "Lofoten er en øygruppe i Nordland med spisse fjell som reiser seg rett opp fra havet. Hver vinter kommer "
    "skreien, torsken fra Barentshavet, inn til kysten for å gyte, og fisket har vært viktig her i over "
    "tusen år. Tørrfisken henger på hjeller i vårsola. Fra Bodø går det ferje over Vestfjorden til "
    "Moskenes.",

    "Ålesund brant nesten helt ned i 1904. Byen ble bygget opp igjen i murstein, og mange av husene fikk "
    "tidens stil, jugendstil, med tårn, buer og pynt. I dag er sentrum et av de best bevarte "
    "jugendstilmiljøene i Europa. Fra byfjellet Aksla ser man ut over byen, øyene og fjellene på Sunnmøre.",

    "Kristiansand er Sørlandets største by. Sentrum er bygget i et rutenett av rette gater, som kalles "
    "Kvadraturen. Om sommeren er byen full av båtfolk og turister, og skjærgården utenfor er et yndet mål "
    "for dem som liker å bade og fiske.",

    # Weather
    "I dag begynte dagen med tåke over fjorden, men utover formiddagen lettet den, og sola kom fram. Det var "
    "vindstille og nesten ti grader varmt. Om ettermiddagen trakk skyene seg sammen igjen fra vest, og i "
    "kveld regner det. Meteorologene sier at det blir kaldere i morgen, med sludd i høyden.",

    "Vinteren i innlandet er ofte kald og tørr. Når et høytrykk ligger over Østlandet i januar, kan "
    "temperaturen falle til tretti minusgrader i dalene, fordi den kalde lufta er tyngre og samler seg i "
    "lavlandet. Samtidig kan det være mildere oppe i liene. Dette kalles temperaturinversjon.",

    "Kysten får mye nedbør fordi fuktig luft fra Atlanterhavet blir presset opp når den møter fjellene. "
    "Lufta avkjøles, vanndampen kondenserer, og det regner. På den andre siden av fjellene er det ofte mye "
    "tørrere. Derfor er det stor forskjell på været i Bergen og i Lom, selv om avstanden ikke er så stor.",

    "Det snødde hele natta. Da vi våknet, lå det en halv meter nysnø i hagen, og bilen var helt dekket. "
    "Naboen var allerede ute med snøfreseren. Barna ville ikke spise frokost; de ville bare ut og bygge "
    "snølykter.",

    "Høsten kom tidlig i år. Allerede i slutten av august ble bjørkene gule oppe i lia, og om morgenen var "
    "det rim på gresset. I september regnet det nesten hver dag, men i oktober fikk vi noen klare, kalde "
    "dager med sol og stille luft.",

    "Våren er den tiden mange nordmenn gleder seg mest til. Dagene blir lengre, snøen smelter, og bekkene "
    "flommer over. De første hestehovene dukker opp i veikanten, og trekkfuglene kommer tilbake fra sør. "
    "Likevel kan det komme snø helt til mai, så det lønner seg ikke å skifte til sommerdekk for tidlig.",

    # Nature
    "Elgen er Norges største landdyr. En voksen okse kan veie over fem hundre kilo. Elgen spiser kvister, "
    "bark og blader, og om vinteren trekker den ofte ned mot dalbunnen der snøen er mindre dyp. Mange "
    "bilister har fått seg en støkk når en elg plutselig står midt i veien en mørk høstkveld.",

    "Fjellrypa skifter farge med årstidene. Om sommeren er fjærdrakten brunspraglete, slik at den gjemmer "
    "seg godt mellom lyng og steiner. Om vinteren blir den nesten helt hvit. Også føttene er dekket av "
    "fjær, som virker som små truger i snøen.",

    "Langs kysten kan man se havørna sveve høyt over sjøen. Det er Nordens største rovfugl, og vingespennet "
    "kan bli over to meter. For femti år siden var det få havørner igjen, men etter at arten ble fredet, "
    "har bestanden økt kraftig.",

    "Blåbær og tyttebær vokser i nesten hver norsk skog. Allemannsretten gir alle lov til å plukke bær og "
    "sopp i utmark, så lenge man tar hensyn til naturen og til dem som bor der. Mange familier drar på "
    "bærtur i august og lager syltetøy av det de finner.",

    "Fjordene ble formet av isbreer under istidene. Isen gravde ut dype daler, og da den smeltet, steg havet "
    "inn i dalene. Sognefjorden er den lengste fjorden i Norge, over to hundre kilometer lang, og på det "
    "dypeste er den mer enn tolv hundre meter dyp.",

    "Jostedalsbreen er den største isbreen på fastlandet i Europa. Som de fleste breer i verden har den "
    "blitt mindre de siste tiårene. Forskere måler hvor mye snø som faller om vinteren og hvor mye is som "
    "smelter om sommeren, og regnskapet har i mange år vist underskudd.",

    "Laksen klekkes i elva og lever der de første årene. Så vandrer den ut i havet, der den vokser seg stor "
    "på rikelig med mat. Etter ett til fire år finner den veien tilbake til den samme elva den kom fra, for "
    "å gyte. Hvordan laksen finner fram, er fortsatt ikke helt forstått, men luktesansen spiller en viktig "
    "rolle.",

    "Lemenet er en liten gnager som lever på fjellet. Noen år blir det svært mange lemen, og da kan man se "
    "dem overalt i fjellheimen. Slike lemenår gir mye mat til rev, snøugle og rovfugler. Etterpå faller "
    "bestanden brått igjen, og det kan gå flere år før neste topp.",

    # Everyday life
    "Kari står opp klokka halv sju. Hun setter på kaffen, smører matpakke til seg selv og barna og sjekker "
    "været på telefonen. Klokka åtte sykler hun til jobben, mens barna går til skolen sammen med naboene. I "
    "matpausen spiser hun brødskivene med brunost og leser nyheter.",

    "På fredag hadde vi taco, som vi pleier. Alle hjelper til: noen skjærer grønnsaker, noen steker "
    "kjøttdeigen, og den yngste dekker bordet. Etterpå så vi en film sammen i sofaen. Det er den beste "
    "kvelden i uka, synes jeg.",

    "Søndagstur er en gammel tradisjon. Man pakker sekken med kakao, appelsiner og sjokolade og går en tur i "
    "skogen eller på fjellet. Underveis hilser man på folk man møter, selv om man ikke kjenner dem. Om "
    "vinteren går mange på ski i lysløypa etter jobb.",

    "Dugnad betyr at folk gjør en felles jobb uten å få betalt. Borettslaget vårt har dugnad hver vår: vi "
    "raker løv, vasker trappene og maler benkene. Etterpå griller vi pølser sammen. Mange sier at dugnaden "
    "er en viktig del av det norske samfunnet.",

    "Jeg har nettopp flyttet til en ny leilighet. Den er ikke stor, bare to rom og et lite kjøkken, men den "
    "har en balkong mot sør. Om morgenen kan jeg sitte ute med kaffen og se på folk som går forbi. Det tar "
    "ti minutter å gå til butikken og et kvarter til togstasjonen.",

    "Bussen var forsinket i morges. Det hadde snødd i natt, og brøytebilene hadde ikke rukket alle veiene. "
    "Jeg sendte en melding til sjefen og sa at jeg ville komme en halvtime for sent. Hun svarte at det "
    "gjaldt nesten alle på kontoret.",

    "På biblioteket kan man låne bøker, filmer og spill. Mange bibliotek har også arrangementer, som "
    "forfattermøter, språkkafé og leksehjelp. Språkkafeen er populær blant folk som lærer norsk: der kan de "
    "øve seg på å snakke med frivillige over en kopp te.",

    "Handleliste for helgen:\n- melk\n- brød\n- egg\n- tomater\n- ost\n- kaffe\n\nHusk å ta med "
    "handleposer!",

    "Hei Ingrid!\n\nTakk for sist. Det var veldig hyggelig å se deg i Trondheim. Jeg håper du kom trygt "
    "hjem.\n\nVi har hatt mye regn her i det siste, men i dag skinner sola endelig. Neste måned reiser jeg "
    "til Tromsø for å besøke broren min. Kanskje vi kan møtes når jeg kommer tilbake?\n\nHilsen Marit",

    "Vafler (omtrent ti stykker)\n\nIngredienser:\n4 egg\n1 dl sukker\n5 dl hvetemel\n5 dl melk\n100 g "
    "smeltet smør\n1 ts kardemomme\n\nSlik gjør du:\n1. Visp egg og sukker luftig.\n2. Tilsett mel og melk "
    "vekselvis, og rør til en glatt røre.\n3. Rør inn smøret og kardemommen.\n4. La røren svelle i et "
    "kvarter.\n5. Stek vaflene gylne i vaffeljernet.\n\nServeres med rømme og syltetøy.",

    "– Unnskyld, vet du hvor togstasjonen er?\n– Ja, gå rett fram til du kommer til lyskrysset, og ta så "
    "til venstre. Den ligger på høyre side.\n– Er det langt å gå?\n– Nei, det tar bare fem minutter.\n– "
    "Tusen takk!\n– Bare hyggelig.",

    "Viktig melding til beboerne\n\n\nVannet blir stengt tirsdag fra klokka 9 til 14 på grunn av "
    "reparasjoner i kjelleren.\n\nVi beklager ulempene.\n\n\nHilsen styret",

    "– Hva skal vi gjøre i helgen?\n– Jeg tenkte vi kunne dra på hytta. Værmeldingen sier sol på "
    "lørdag.\n– Da må vi handle i kveld, butikken på fjellet stenger tidlig.\n– Greit. Kan du ta med "
    "fiskestanga også?",

    # History
    "Vikingtida regnes vanligvis fra rundt år 800 til 1050. Nordmenn, svensker og dansker reiste da over "
    "havet til England, Irland, Frankrike og langt østover i Russland. Noen kom for å plyndre, men mange "
    "drev handel eller slo seg ned som bønder. Vikingene nådde også Island, Grønland og, rundt år 1000, "
    "Nord-Amerika.",

    "Slaget på Stiklestad i 1030 er en av de mest kjente hendelsene i norsk historie. Kong Olav Haraldsson "
    "falt i slaget, men kort tid etter ble han regnet som helgen. Dyrkingen av Olav den hellige bidro til at "
    "kristendommen slo rot i landet, og pilegrimer har i hundrevis av år gått til Nidaros.",

    "Svartedauden kom til Norge i 1349 med et skip til Bergen. Pesten spredte seg raskt, og kanskje "
    "halvparten av befolkningen døde. Mange gårder ble stående tomme i lang tid etterpå, og det tok flere "
    "hundre år før folketallet var like høyt igjen.",

    "Den 17. mai 1814 ble Norges grunnlov underskrevet på Eidsvoll. Samme år måtte Norge likevel gå inn i en "
    "union med Sverige, men med egen grunnlov og eget storting. Unionen ble oppløst i 1905, og prins Carl av "
    "Danmark ble valgt til konge under navnet Haakon VII. I dag feires 17. mai med barnetog, flagg og is "
    "over hele landet.",

    "Tyske styrker angrep Norge 9. april 1940. Kongen og regjeringen kom seg til London, der de ledet "
    "motstanden i fem år. Under okkupasjonen var det rasjonering, og mange nordmenn deltok i "
    "motstandsarbeid. Krigen i Norge sluttet 8. mai 1945, og kongen kom tilbake til Oslo 7. juni samme år.",

    "I 1969 ble Ekofisk-feltet funnet i Nordsjøen. Oljen forandret Norge på få tiår. Staten bygde opp et "
    "eget oljeselskap, og inntektene settes nå i et fond som skal komme både dagens og framtidens "
    "generasjoner til gode.",

    "Samene er et urfolk som har bodd i Sápmi, et område som strekker seg over Norge, Sverige, Finland og "
    "Russland, i tusenvis av år. På 1800- og 1900-tallet førte staten en fornorskingspolitikk der samiske "
    "barn måtte lære norsk på skolen, og mange sluttet å bruke samisk. Siden 1980-tallet har samiske språk "
    "fått en sterkere stilling, og i dag finnes det samiske barnehager, skoler og medier.",

    "Hurtigruten begynte å gå langs kysten i 1893. Før den tid kunne det ta uker å sende brev og varer fra "
    "Trondheim til Hammerfest om vinteren. Skipene gikk også i mørketida, med kompass og klokke som "
    "viktigste hjelpemidler. I dag stopper skipene i over tretti havner mellom Bergen og Kirkenes.",

    # Science
    "Nordlyset oppstår når elektrisk ladde partikler fra sola treffer jordas atmosfære. Jordas magnetfelt "
    "leder partiklene mot områdene rundt polene. Når partiklene kolliderer med oksygen- og nitrogenatomer "
    "høyt oppe i atmosfæren, sender atomene ut lys. Oksygen gir det vanlige grønne lyset, mens nitrogen kan "
    "gi blå og lilla farger.",

    "Midnattssola skyldes at jordaksen heller omtrent 23 grader i forhold til banen rundt sola. Om sommeren "
    "heller den nordlige halvkulen mot sola, og nord for polarsirkelen går sola ikke ned på en stund. Jo "
    "lenger nord man kommer, desto lenger varer perioden. På Svalbard kan man se midnattssol fra april til "
    "august.",

    "Plantene lager sin egen næring gjennom fotosyntesen. I bladene tar de opp karbondioksid fra lufta og "
    "vann fra jorda, og ved hjelp av energi fra sollys lager de sukker og oksygen. Oksygenet slipper de ut i "
    "lufta. Nesten alt liv på jorda er avhengig av denne prosessen, direkte eller indirekte.",

    "Vannet på jorda er i stadig bevegelse. Sola varmer opp hav og innsjøer, og vann fordamper. Vanndampen "
    "stiger, avkjøles og danner skyer. Når dråpene i skyene blir store nok, faller de ned som regn eller "
    "snø. Vannet renner så i bekker og elver tilbake til havet, eller siger ned i grunnen og blir "
    "grunnvann.",

    "Himmelen er blå fordi sollyset spres av molekylene i lufta. Blått lys har kortere bølgelengde enn rødt "
    "lys og spres mye mer. Når sola står lavt, om morgenen og kvelden, må lyset gå en lengre vei gjennom "
    "atmosfæren. Da blir mye av det blå lyset spredt bort før det når oss, og himmelen kan bli rød og "
    "oransje.",

    "Tidevannet skyldes først og fremst månens tyngdekraft. Månen trekker litt sterkere i den siden av jorda "
    "som vender mot den, og havet hever seg der. På motsatt side oppstår også en flo. Derfor har de fleste "
    "steder to flo og to fjære i døgnet. I Saltstraumen nær Bodø presses store mengder vann gjennom et smalt "
    "sund, og der finner vi en av verdens sterkeste tidevannsstrømmer.",

    "En språkmodell er et dataprogram som har lært å forutsi det neste ordet i en tekst. Under treningen "
    "leser modellen store mengder tekst, og etter hvert lærer den mønstre i språket: grammatikk, vanlige "
    "uttrykk og mye om verden. Teksten deles først opp i små biter som kalles tokens. Et token kan være et "
    "helt ord, en del av et ord eller et enkelt tegn.",

    "Nesten all strøm i Norge kommer fra vannkraft. Vann fra magasiner høyt oppe i fjellet ledes gjennom rør "
    "ned til kraftstasjonene, der det driver turbiner som lager elektrisitet. Fordi regn og snø varierer fra "
    "år til år, varierer også hvor mye kraft som kan produseres.",

    "Norsk har to offisielle skriftspråk, bokmål og nynorsk. Bokmål bygger på dansk skriftspråk, som var "
    "det vanlige i Norge i flere hundre år. Nynorsk ble laget av Ivar Aasen på 1800-tallet, på grunnlag av "
    "norske dialekter. Alle elever lærer begge målformene på skolen. I tillegg er samisk offisielt språk i "
    "flere kommuner.",

    "Vann fryser til is ved null grader, men sjøvann fryser først ved omtrent minus to grader, fordi saltet "
    "senker frysepunktet. Derfor strør man salt på veiene om vinteren. Isen er lettere enn vann og flyter, "
    "og det er grunnen til at innsjøer fryser ovenfra og ned. Fiskene kan dermed overleve vinteren i vannet "
    "under isen.",

    "Jorda går rundt sola på omtrent 365 dager, og samtidig snurrer den rundt sin egen akse en gang i døgnet. "
    "Fordi et år er litt lengre enn 365 dager, legger vi til en skuddårsdag, 29. februar, nesten hvert "
    "fjerde år. Uten skuddår ville kalenderen sakte gli bort fra årstidene.",

    "Et lyn er en gigantisk elektrisk utladning. I tordenskyer gnis iskrystaller og dråper mot hverandre, og "
    "skyen blir elektrisk ladet. Når spenningen blir stor nok, slår lynet ned. Lyset kommer fram nesten med "
    "en gang, mens lyden av tordenen går mye saktere. Teller man sekundene mellom lyn og torden og deler på "
    "tre, får man omtrent avstanden i kilometer.",
]
