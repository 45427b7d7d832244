"""The lookup environment's corpus and questions: short invented encyclopedia entries (so no model can answer from
memory, only by searching), each with one question whose gold answer is a word or number of the entry. Written for
llmstack; the last HELD_OUT questions are the held-out problems the agent eval scores and training never sees."""

DOCUMENTS = [
    ("Velmora Lighthouse", "The Velmora Lighthouse stands on Cape Orrin and was first lit in 1873. Its keeper for "
                           "forty years was Ada Brenwick."),
    ("Quillon River", "The Quillon River rises in the Tasker Hills and flows 412 kilometres to the Gulf of Marrow."),
    ("Harbin Crater", "Harbin Crater is an impact crater 27 kilometres wide, named after the astronomer Lise Harbin."),
    ("Orpel Festival", "The Orpel Festival is held every autumn in the town of Dunmere; its symbol is a copper kite."),
    ("Saltgrove Academy", "Saltgrove Academy was founded in 1904 by the engineer Tomas Veil and teaches navigation."),
    ("Emberwick Bridge", "Emberwick Bridge crosses the Quillon River with nine stone arches and opened in 1791."),
    ("Corvane Pepper", "The Corvane pepper is a purple chili grown on the island of Sel; it ripens in March."),
    ("Mount Tirrel", "Mount Tirrel is the highest peak of the Tasker Hills at 2,318 metres."),
    ("Lantern Moth", "The lantern moth feeds only on the nectar of the moonbell flower and lives for six days."),
    ("Dunmere Clock", "The Dunmere town clock has a green face and was built by the clockmaker Otto Fenn."),
    ("Gulf of Marrow", "The Gulf of Marrow is home to the rare silver seal; its main port is Calvey."),
    ("Brenwick Prize", "The Brenwick Prize for coastal rescue is awarded each year in Calvey with a medal of tin."),
    ("Isle of Sel", "The Isle of Sel has a population of 3,450 and its only town is Port Amsel."),
    ("Fenn Observatory", "Fenn Observatory sits on Mount Tirrel; its largest telescope has a 4 metre mirror."),
    ("Moonbell Flower", "The moonbell is a white flower that opens only at night and grows in the Tasker Hills."),
    ("Veil Canal", "The Veil Canal, designed by Tomas Veil, links Dunmere to Calvey and has 14 locks."),
    ("Calvey Market", "Calvey Market opens on Thursdays and is known for smoked eel and blue salt."),
    ("Orrin Cape Trail", "The Cape Orrin trail is 19 kilometres long and ends at the Velmora Lighthouse."),
    ("Amsel Choir", "The Port Amsel choir has 32 singers and performs every midsummer on the harbour wall."),
    ("Tasker Wool", "Tasker wool comes from the grey-faced sheep of the Tasker Hills and is dyed with walnut."),
]

# (question, answer): the answer appears verbatim in one document
QUESTIONS = [
    ("In which year was the Velmora Lighthouse first lit?", "1873"),
    ("How long is the Quillon River, in kilometres?", "412"),
    ("Who is Harbin Crater named after?", "Lise Harbin"),
    ("In which town is the Orpel Festival held?", "Dunmere"),
    ("Who founded Saltgrove Academy?", "Tomas Veil"),
    ("How many arches does Emberwick Bridge have?", "nine"),
    ("On which island is the Corvane pepper grown?", "Sel"),
    ("How tall is Mount Tirrel, in metres?", "2,318"),
    ("How many days does a lantern moth live?", "six"),
    ("Who built the Dunmere town clock?", "Otto Fenn"),
    ("What is the main port of the Gulf of Marrow?", "Calvey"),
    ("What is the Brenwick Prize medal made of?", "tin"),
    ("What is the population of the Isle of Sel?", "3,450"),
    ("How wide is the largest mirror of Fenn Observatory, in metres?", "4"),
    ("What colour is the moonbell flower?", "white"),
    ("How many locks does the Veil Canal have?", "14"),
    ("On which day does Calvey Market open?", "Thursday"),
    ("How long is the Cape Orrin trail, in kilometres?", "19"),
    ("How many singers are in the Port Amsel choir?", "32"),
    ("What is Tasker wool dyed with?", "walnut"),
]

HELD_OUT = 6
