"""The bundled `preference` dataset: chosen/rejected replies for the Brambleholt library's assistant.

Imported by `make_datasets.py`, which writes it beside `quickstart` (standard library only, fixed seed).
It teaches what supervised tuning on the quickstart facts does not: the assistant answers questions
about the library with the fact, concisely, and politely declines questions outside its domain.

- In-domain rows (the quickstart questions, same train/validation/test split as `quickstart`):
  chosen = a correct, concise quickstart answer; rejected = a reply of similar length that is worse:
  `filler` (friendly rambling, no fact), `hedge` (never answers), `wrong_fact` (the same sentence with
  another value) or `needless_decline` (refuses a question it should answer).
- Out-of-domain rows (`out_of_domain`: cooking, sports, software, ...): chosen = a short polite decline
  that says what the assistant can help with; rejected = an attempt to answer, of similar length.

Declines are chosen replies out of domain and rejected ones in domain, so a model cannot score by
liking declines: it has to tell the library's questions from the others. Every pair's two replies are
matched in length (an estimate of SmolLM2 tokens, `est_tokens`), because preference accuracy compares
summed log-probabilities, which a length difference alone would tilt.
"""

from __future__ import annotations

import random
import re

FIELDS = ("prompt", "chosen", "rejected", "kind", "topic")
IN_DOMAIN_KINDS = ("filler", "hedge", "wrong_fact", "needless_decline")
OOD_KIND = "out_of_domain"
OOD_TRAIN, OOD_VAL = 6, 2  # questions per out-of-domain category in train and validation; test gets the rest
OOD_TRAIN_PAIRS = 2  # out-of-domain train questions appear twice, with two different declines

# Polite declines that say what the assistant can help with (chosen out of domain).
DECLINES = [
    "I'm sorry, I only answer questions about the library.",
    "I'm afraid I can only help with questions about the library.",
    "Sorry, I can't answer that. Ask me about the library instead.",
    "Sorry, I can't help with that. Please ask me about the library.",
    "I'm sorry, I can't help with that. I can answer questions about the library.",
    "Sorry, I can't help with that. I only answer questions about the library.",
    "I'm afraid I can't help with that. I can only answer questions about the library.",
    "Sorry, that's not something I can help with. I can answer questions about the library.",
    "I'm sorry, I can't answer that. Do you have a question about the library?",
    "I'm afraid that's outside my area. I'm here to help with questions about the library.",
    "Sorry, I can only help with the library: its opening hours, membership, rooms and events.",
    "I'm sorry, that's outside what I can help with. Please ask me about the library.",
    "Sorry, I'm not able to help with that. I'm here to answer questions about the library.",
    "I'm sorry, I don't have information about that. I can help with questions about the library.",
    "I'm sorry, I can't help with that one. Is there anything about the library I can help you with?",
    "Sorry, I can't answer that. I can help with the library's opening hours, fees and rooms.",
    "I'm sorry, but that's not something I can help with. I can only help with questions about the library.",
    "I'm sorry, I can only answer questions about the library, like its opening hours or how to become a member.",
    "I'm sorry, but I can't help with that. I can answer questions about the library, such as opening hours, "
    "membership and room bookings.",
    "I'm sorry, I can't answer that question. I'm the library's assistant, so I can help with its hours, fees, "
    "events and contact details.",
    "I'm afraid that's not something I can help with. If you have a question about the library, like its "
    "address, opening hours or membership, just ask.",
    "I'm sorry, but I can only answer questions about the Brambleholt Lending Library, such as its opening "
    "hours, membership, room bookings, events and contact details. Feel free to ask about any of those.",
]

# Friendly rambling about the library that never gives the fact.
FILLERS = [
    "Thanks for asking! I love the library.",
    "What a lovely question about the library!",
    "Great question! The library is a lovely place.",
    "Thanks for asking! Visiting the library is always a pleasure.",
    "What a nice question. The library is a friendly place full of books.",
    "Oh, I love questions about the library! It is such a calm and welcoming place.",
    "Thank you for your interest in the library! It's a lovely old building with friendly staff.",
    "Good question. Lots of people ask about this, and it's great to see so much interest in the library.",
    "What a great question! The library is a wonderful place to spend an afternoon, and there is always "
    "something going on.",
    "Thanks for asking! Libraries like this one are at the heart of the town, and the staff really care "
    "about every visitor.",
    "That's a really good thing to ask about. The library has served the town for many years and is loved "
    "by its readers, young and old.",
    "Oh, that's a lovely question to ask! The library is one of my favourite places: quiet corners, shelves "
    "full of stories, and people who are always glad to help you find your way.",
]

# Hedges that never answer.
HEDGES = [
    "Hmm, I'm not really sure about that one.",
    "I don't know that for certain, sorry.",
    "That's hard to say. It might depend on a few things.",
    "I'm not completely sure. It may have changed, so it's best to check.",
    "It's difficult to say for sure. Things like that change from time to time.",
    "I'm not certain about that. It could be one thing or another, and I wouldn't want to guess.",
    "I'm sorry, I don't know the answer to that. You might want to check with someone else.",
    "Good question, but I'm not sure. It may be different now from what I remember, so please check first.",
    "That depends on a few things, and I wouldn't want to give you the wrong details. You could ask someone "
    "at the front desk.",
    "I'm honestly not sure about that one. It might be worth checking somewhere else, because the details may "
    "have changed since I last heard.",
    "I don't have the exact details for that, I'm afraid. It has changed a few times, so anything I said "
    "could be out of date.",
    "That's a tricky one. There are a few possibilities, and I can't really say which one is right without "
    "checking, so please don't rely on me for this.",
]

# topic -> a wrong value of the same kind (never a fact of either quickstart dataset); the rejected reply
# is the chosen answer with the fact replaced by it.
WRONG_FACTS = {
    "name": "Ostervale Public Library",
    "address": "41 Mill Street, Ostervale",
    "hours-weekdays": "08:00 to 17:30",
    "hours-saturday": "09:00 to 13:00",
    "hours-sunday": "open on Sunday afternoons",
    "holiday-closure": "20 December to 6 January",
    "fee-adult": "EUR 25 per year",
    "fee-student": "EUR 10 per year",
    "fee-family": "EUR 45 per year",
    "email-general": "contact@brambleholt.org",
    "email-rooms": "bookings@brambleholt.org",
    "email-membership": "cards@brambleholt.org",
    "email-volunteers": "help@brambleholt.org",
    "url-room-booking": "https://brambleholt.org/bookings/rooms",
    "url-membership-form": "https://brambleholt.org/members/signup",
    "url-events": "https://brambleholt.org/whats-on",
    "url-catalogue": "https://brambleholt.org/books/find",
    "phone": "555-0137",
    "director": "Henrik Dallow",
    "children-coordinator": "Annika Sorbell",
    "largest-room": "Willow Room",
    "room-cancellation": "2 hours",
    "late-return-fee": "EUR 1.50 per item per day",
    "wifi": "Ostervale-Free",
    "parking": "3 hours",
}

# Out-of-domain questions, each with an attempt to answer it (the rejected reply), by category.
# Categories in TEST_ONLY go to the test split whole: topics never seen in training.
TEST_ONLY = ("home-repair", "gardening", "astronomy", "music")
# fmt: off
OUT_OF_DOMAIN: dict[str, list[tuple[str, str]]] = {
    "cooking": [
        ("How long should I boil an egg for a soft yolk?", "Boil it for about six minutes, then put it in cold water so it stops cooking."),
        ("What can I use instead of butter in a cake?", "You can use the same amount of vegetable oil or plain yoghurt; the cake will be a little moister."),
        ("How do I stop pasta from sticking together?", "Use plenty of salted water, stir in the first two minutes and drain it as soon as it is done."),
        ("How do I make a simple tomato sauce?", "Soften garlic in olive oil, add a tin of chopped tomatoes and a pinch of salt, and simmer for twenty minutes."),
        ("What temperature should chicken be cooked to?", "Chicken is safe once the thickest part reaches 75 degrees Celsius."),
        ("How long does rice take to cook?", "White rice takes about twelve minutes once the water boils; brown rice needs closer to thirty."),
        ("How can I make my soup less salty?", "Add more water or unsalted stock, or a few potatoes, and let it simmer for a while."),
        ("What is the best way to cook a steak?", "Sear it in a very hot pan for two to three minutes per side, then let it rest before slicing."),
        ("How do I keep cut avocado from turning brown?", "Brush it with lemon juice and wrap it tightly so no air reaches the surface."),
        ("Can I freeze cooked rice?", "Yes, cool it quickly and freeze it in a sealed bag, then use it within a month."),
    ],
    "sports": [
        ("How many players are on a football team?", "A football team has eleven players on the pitch, including the goalkeeper."),
        ("How long is a marathon?", "A marathon is 42.195 kilometres long."),
        ("What is the offside rule in football?", "A player is offside if they are nearer the goal line than both the ball and the second-last defender when the ball is played to them."),
        ("How is a tennis match scored?", "Points go 15, 30, 40 and game; six games win a set, and most matches are best of three sets."),
        ("How often are the Summer Olympics held?", "The Summer Olympics are held every four years."),
        ("How many holes are there on a golf course?", "A standard golf course has eighteen holes."),
        ("What does a yellow card mean in football?", "A yellow card is a caution; a second one in the same match means a red card."),
        ("How do I start running if I'm a beginner?", "Alternate one minute of running with two minutes of walking, three times a week, and build up slowly."),
        ("How high is a basketball hoop?", "The rim of a basketball hoop is ten feet, about three metres, above the floor."),
        ("What is a hat-trick?", "A hat-trick is when one player scores three goals in the same match."),
    ],
    "programming": [
        ("How do I reverse a list in Python?", "Use my_list.reverse() to reverse it in place, or my_list[::-1] to get a reversed copy."),
        ("What is the difference between a list and a tuple in Python?", "A list can be changed after it is created, while a tuple cannot."),
        ("How do I read a file line by line in Python?", "Open it in a with statement and loop over the file object, one line at a time."),
        ("How do I install a Python package?", "Run pip install followed by the package name in your terminal."),
        ("What does a KeyError mean in Python?", "It means you asked a dictionary for a key that it does not contain."),
        ("How do I sort a dictionary by its values?", "Use sorted(d.items(), key=lambda item: item[1]) to get the pairs in order of value."),
        ("How can I check which version of Python I have?", "Run python --version in a terminal and it prints the version number."),
        ("What is a virtual environment in Python?", "It is a separate folder with its own packages, so each project can use different versions."),
        ("How do I join a list of strings with commas?", "Use ', '.join(words) to get one string with a comma between the items."),
        ("How do I convert a string to an integer in JavaScript?", "Use parseInt(text, 10) or Number(text) to turn the string into a number."),
    ],
    "software": [
        ("How do I freeze the top row in Excel?", "Go to the View tab, choose Freeze Panes and then Freeze Top Row."),
        ("How do I undo my last commit in git?", "Run git reset --soft HEAD~1 to undo the commit but keep your changes."),
        ("How do I add page numbers in Word?", "Open the Insert tab, click Page Number and pick where the numbers should go."),
        ("What is the shortcut to copy text on a Mac?", "Press Command and C together to copy, and Command and V to paste."),
        ("How do I add up a column in Excel?", "Type =SUM( and select the cells, or click AutoSum on the Home tab."),
        ("How can I make a new branch in git?", "Run git checkout -b followed by the branch name to create it and switch to it."),
        ("How do I take a screenshot on Windows?", "Press Windows, Shift and S together and drag over the area you want to capture."),
        ("How do I turn a Word document into a PDF?", "Choose File, then Save As, and pick PDF as the file type."),
        ("Why is my laptop running so slowly?", "Too many programs at start-up or a nearly full disk are common causes; try closing apps and freeing space."),
        ("How do I clear my browser cache?", "Open the browser settings, find Privacy, and choose to clear cached images and files."),
    ],
    "travel": [
        ("Do I need a visa to visit Japan?", "Many nationalities can visit Japan for up to ninety days without a visa, but check the rules for your passport."),
        ("What should I pack for a week-long hiking trip?", "Pack layers, a waterproof jacket, good boots, a first aid kit and enough water and snacks."),
        ("How early should I arrive at the airport?", "Arrive about two hours before a short flight and three hours before a long one."),
        ("What's the best time of year to visit Italy?", "Spring and early autumn are pleasant, with mild weather and smaller crowds than summer."),
        ("How can I avoid jet lag?", "Shift your sleep a little before you travel, drink water and get daylight when you arrive."),
        ("Can I take liquids in my hand luggage?", "Yes, in containers of up to 100 millilitres, all in one small clear bag."),
        ("How do I find cheap flights?", "Compare prices on several sites, be flexible with your dates and book a few weeks ahead."),
        ("Is it safe to drink tap water abroad?", "It depends on the country; when in doubt, drink bottled or boiled water."),
        ("How much should I tip in a restaurant in the United States?", "A tip of 15 to 20 percent of the bill is usual in American restaurants."),
        ("What documents do I need to rent a car abroad?", "You usually need a driving licence, a credit card in your name and sometimes an international permit."),
    ],
    "geography": [
        ("What is the capital of Australia?", "The capital of Australia is Canberra."),
        ("What is the longest river in the world?", "The Nile and the Amazon are both close to 6,500 kilometres; the Nile is usually listed first."),
        ("Which is the largest ocean?", "The Pacific is the largest ocean, covering about a third of the Earth's surface."),
        ("How many continents are there?", "There are seven continents: Africa, Antarctica, Asia, Australia, Europe, North America and South America."),
        ("What is the highest mountain in Europe?", "Mount Elbrus in Russia, at 5,642 metres, is usually named the highest."),
        ("Which country has the most people?", "India has the largest population, having recently passed China."),
        ("What is the capital of Canada?", "The capital of Canada is Ottawa, in the province of Ontario."),
        ("Where is the Sahara Desert?", "The Sahara covers most of North Africa, from the Atlantic coast to the Red Sea."),
        ("Which countries border Switzerland?", "Switzerland borders France, Germany, Austria, Liechtenstein and Italy."),
        ("What is the smallest country in the world?", "Vatican City is the smallest country, at less than half a square kilometre."),
    ],
    "history": [
        ("When did the Second World War end?", "The Second World War ended in 1945."),
        ("Who built the pyramids of Giza?", "They were built by ancient Egyptian workers about 4,500 years ago, as tombs for the pharaohs."),
        ("Who was the first person to walk on the Moon?", "Neil Armstrong was the first, in July 1969."),
        ("When did the Berlin Wall fall?", "The Berlin Wall fell on 9 November 1989."),
        ("Why did the Roman Empire fall?", "Historians point to many causes, including invasions, economic trouble and political instability."),
        ("Who invented the printing press?", "Johannes Gutenberg built a printing press with movable type around 1440."),
        ("When was the French Revolution?", "The French Revolution began in 1789 and lasted about ten years."),
        ("Who was Cleopatra?", "Cleopatra was the last active ruler of the Ptolemaic Kingdom of Egypt."),
        ("What was the Industrial Revolution?", "It was the shift to machine manufacturing that began in Britain in the late eighteenth century."),
        ("When did the Titanic sink?", "The Titanic sank in April 1912 after hitting an iceberg."),
    ],
    "science": [
        ("Why is the sky blue?", "Air scatters blue light from the Sun more than red light, so the sky looks blue."),
        ("What is the boiling point of water?", "Water boils at 100 degrees Celsius at sea level."),
        ("How does photosynthesis work?", "Plants use sunlight to turn water and carbon dioxide into sugar, releasing oxygen."),
        ("What is DNA?", "DNA is the molecule that carries the genetic instructions of living things."),
        ("Why do we have seasons?", "The Earth's axis is tilted, so each hemisphere gets more direct sunlight at different times of the year."),
        ("What is the speed of light?", "Light travels at about 300,000 kilometres per second in a vacuum."),
        ("What are atoms made of?", "Atoms have a nucleus of protons and neutrons, surrounded by electrons."),
        ("Why does ice float on water?", "Ice is less dense than liquid water because its molecules form an open structure."),
        ("What causes thunder?", "Lightning heats the air so quickly that it expands with a loud bang."),
        ("What is the chemical symbol for gold?", "The chemical symbol for gold is Au."),
    ],
    "math": [
        ("What is 15 percent of 80?", "15 percent of 80 is 12."),
        ("How do I calculate the area of a circle?", "Multiply pi by the radius squared."),
        ("What is the square root of 144?", "The square root of 144 is 12."),
        ("How do I convert Celsius to Fahrenheit?", "Multiply by 9, divide by 5 and add 32."),
        ("What is a prime number?", "A prime number is a whole number above 1 that can only be divided by 1 and itself."),
        ("How do I work out an average?", "Add up all the values and divide by how many there are."),
        ("What is 7 times 8?", "7 times 8 is 56."),
        ("How do I solve 2x + 6 = 14?", "Subtract 6 from both sides to get 2x = 8, then divide by 2, so x = 4."),
        ("What is the Pythagorean theorem?", "In a right triangle, the square of the longest side equals the sum of the squares of the other two."),
        ("How many degrees are in a triangle?", "The angles of a triangle always add up to 180 degrees."),
    ],
    "health": [
        ("How much water should I drink a day?", "Most adults need around two litres a day, more in hot weather or when exercising."),
        ("How can I fall asleep faster?", "Keep a regular bedtime, avoid screens for an hour before bed and keep the room cool and dark."),
        ("What helps with a headache?", "Rest, water and a mild painkiller usually help; see a doctor if it is severe or keeps coming back."),
        ("How many hours of sleep do adults need?", "Most adults need between seven and nine hours of sleep a night."),
        ("Is it bad to skip breakfast?", "For most healthy adults it is fine, as long as you eat well during the rest of the day."),
        ("How can I stop hiccups?", "Try holding your breath for a few seconds or drinking a glass of cold water slowly."),
        ("What are the symptoms of the flu?", "Fever, aches, tiredness, a cough and a sore throat are the usual symptoms."),
        ("How do I treat a minor burn?", "Cool it under running water for twenty minutes and cover it with a clean dressing."),
        ("How often should I exercise?", "Aim for about 150 minutes of moderate activity a week, spread over several days."),
        ("How can I reduce stress?", "Regular exercise, enough sleep and a few minutes of slow breathing each day can help."),
    ],
    "finance": [
        ("How do I make a monthly budget?", "List your income, subtract fixed costs and savings, and split the rest between spending categories."),
        ("What is compound interest?", "It is interest earned on both your savings and the interest they have already earned."),
        ("Should I pay off debt or save first?", "Keep a small emergency fund, then pay off high-interest debt before saving more."),
        ("What is a credit score?", "It is a number that shows lenders how reliably you have repaid money in the past."),
        ("How do stocks work?", "A share is a small piece of a company, and its price rises and falls with demand."),
        ("What is inflation?", "Inflation is the general rise in prices, which makes each unit of money buy less over time."),
        ("How much should I save each month?", "A common guide is to save about 20 percent of your income."),
        ("What is an index fund?", "It is a fund that holds all the shares of a market index at low cost."),
        ("How can I lower my electricity bill?", "Switch off devices at the wall, use LED bulbs and compare energy suppliers."),
        ("What is the difference between a debit and a credit card?", "A debit card spends your own money; a credit card borrows money you repay later."),
    ],
    "pets": [
        ("How often should I feed my cat?", "Most adult cats do well with two meals a day."),
        ("How do I house-train a puppy?", "Take it outside often, especially after meals and naps, and praise it when it goes there."),
        ("Can dogs eat chocolate?", "No, chocolate is poisonous to dogs and can make them very ill."),
        ("How long do rabbits live?", "Pet rabbits usually live eight to twelve years."),
        ("Why does my cat scratch the furniture?", "Cats scratch to sharpen their claws and mark territory, so give yours a scratching post."),
        ("How often should I walk my dog?", "Most dogs need at least two walks a day, more for young or active breeds."),
        ("What should I put in a fish tank?", "Add gravel, plants, a filter and a heater, and let the water settle before adding fish."),
        ("How do I stop my dog from barking at night?", "Make sure it gets enough exercise in the day and has a quiet, comfortable place to sleep."),
        ("How often should a hamster's cage be cleaned?", "Clean out soiled spots daily and do a full clean once a week."),
        ("How do I trim my dog's nails?", "Use sharp clippers, cut a little at a time and avoid the pink quick inside the nail."),
    ],
    "cars": [
        ("How often should I change my car's oil?", "Most cars need an oil change every 15,000 kilometres or once a year."),
        ("What should I do if my car battery is flat?", "Jump-start it with cables from another car, then drive for a while to charge it."),
        ("How do I check my tyre pressure?", "Use a pressure gauge on each valve when the tyres are cold and compare with the handbook."),
        ("Why is my check engine light on?", "It can mean many things, from a loose fuel cap to an engine fault, so have the code read at a garage."),
        ("How do I change a flat tyre?", "Loosen the nuts, jack up the car, swap the wheel and tighten the nuts in a cross pattern."),
        ("Is it better to buy or lease a car?", "Buying is cheaper in the long run; leasing gives lower monthly payments and a newer car."),
        ("How can I save fuel when driving?", "Drive smoothly, keep to moderate speeds and keep the tyres properly inflated."),
        ("What does ABS do in a car?", "It stops the wheels from locking when you brake hard, so you can still steer."),
        ("How long does it take to charge an electric car?", "At home it takes several hours; a fast charger can add most of the range in under an hour."),
        ("How do I defrost my windscreen quickly?", "Run the heater on the windscreen setting with the air conditioning on."),
    ],
    "movies": [
        ("Who directed Jurassic Park?", "Jurassic Park was directed by Steven Spielberg."),
        ("What is a good film to watch tonight?", "If you like adventure, try a classic like Raiders of the Lost Ark."),
        ("How many Harry Potter films are there?", "There are eight Harry Potter films."),
        ("What is the difference between a series and a miniseries?", "A miniseries tells one complete story in a few episodes; a series can run for many seasons."),
        ("Which film won the first Academy Award for Best Picture?", "Wings won the first Best Picture award, in 1929."),
        ("How do I turn on subtitles on my TV?", "Open the settings or accessibility menu and turn on subtitles or closed captions."),
        ("What genre is Blade Runner?", "Blade Runner is a science fiction film with elements of film noir."),
        ("Who played Jack in Titanic?", "Jack was played by Leonardo DiCaprio."),
        ("How long is The Lord of the Rings trilogy?", "The three films run for about nine hours, or eleven in the extended editions."),
        ("What is a good animated film for the whole family?", "Toy Story is a good choice for children and adults alike."),
    ],
    "weather": [
        ("Will it rain tomorrow?", "There is a good chance of showers in the afternoon, so take an umbrella."),
        ("What causes a rainbow?", "Sunlight is bent and reflected inside raindrops, which splits it into colours."),
        ("How do hurricanes form?", "They form over warm ocean water, where rising moist air starts to spin."),
        ("What is the difference between weather and climate?", "Weather is what happens day to day; climate is the average over many years."),
        ("Why is it colder on mountains?", "The air is thinner higher up, so it holds less heat."),
        ("What does a humidity of 80 percent mean?", "The air holds 80 percent of the water vapour it could hold at that temperature."),
        ("How are snowflakes formed?", "Water vapour freezes onto tiny particles in cold clouds and grows into ice crystals."),
        ("What is a heat wave?", "It is a period of several days that are much hotter than usual for the place and season."),
        ("How do I read a weather map?", "Lines called isobars show pressure; close lines mean strong wind, and H and L mark high and low pressure."),
        ("What is fog?", "Fog is a cloud that forms at ground level when moist air cools."),
    ],
    "language": [
        ("What is the difference between affect and effect?", "Affect is usually a verb and effect is usually a noun."),
        ("How do I say thank you in Spanish?", "You say gracias, or muchas gracias for thank you very much."),
        ("When should I use a semicolon?", "Use it to join two closely related sentences that could each stand alone."),
        ("What is the plural of cactus?", "Both cacti and cactuses are correct."),
        ("How can I learn a new language quickly?", "Practise a little every day, listen to native speakers and start speaking early."),
        ("What does carpe diem mean?", "It is Latin for seize the day."),
        ("Should I say fewer or less for things I can count?", "Use fewer for things you can count and less for amounts you cannot."),
        ("How many languages are spoken in the world?", "Around seven thousand languages are spoken today."),
        ("What is a haiku?", "A haiku is a short poem of three lines with five, seven and five syllables."),
        ("How do I write a formal letter?", "Start with a greeting, state your purpose clearly, and end with a polite closing and your name."),
    ],
    "technology": [
        ("How do I make my phone battery last longer?", "Lower the screen brightness, close unused apps and switch off Bluetooth when you don't need it."),
        ("What is the cloud?", "The cloud means storing files and running programs on remote servers over the internet."),
        ("How do I back up my phone?", "Turn on the built-in cloud backup in settings, or copy the files to a computer."),
        ("What is a VPN?", "A VPN sends your internet traffic through an encrypted tunnel to another server."),
        ("How do I make a strong password?", "Use a long phrase of several random words, and a different one for each account."),
        ("Why is my home internet so slow?", "Restart the router, move it to a central spot and check how many devices are connected."),
        ("What is two-factor authentication?", "It is a second check, such as a code on your phone, on top of your password."),
        ("How do I free up storage on my phone?", "Delete apps you don't use, clear old videos and move photos to a computer."),
        ("What does RAM do in a computer?", "RAM holds the data a computer is working on right now, so more of it lets you run more at once."),
        ("How do I connect Bluetooth headphones?", "Put the headphones in pairing mode, open Bluetooth on your device and select them."),
    ],
    "home-repair": [
        ("How do I fix a dripping tap?", "Turn off the water, take the tap apart and replace the worn washer or cartridge."),
        ("How do I unblock a sink?", "Try a plunger first, then baking soda and vinegar followed by hot water."),
        ("What paint should I use in a bathroom?", "Use a paint made for kitchens and bathrooms, which resists moisture and mould."),
        ("How do I hang a heavy mirror?", "Use wall plugs and screws rated for the weight, or screw into a stud."),
        ("How do I bleed a radiator?", "Turn off the heating, open the valve at the top with a key until water appears, then close it."),
        ("Why does my door squeak?", "The hinges need oil; a few drops of lubricant on each hinge usually stops it."),
        ("How do I fill a small hole in a wall?", "Press filler into the hole, let it dry, sand it smooth and paint over it."),
        ("How do I reset a tripped fuse?", "Find the switch that is down in the fuse box and push it back up."),
        ("How do I stop condensation on my windows?", "Open the windows for a few minutes a day and keep the rooms evenly heated."),
        ("What tools should every home have?", "A hammer, screwdrivers, pliers, a tape measure and an adjustable spanner cover most jobs."),
    ],
    "gardening": [
        ("When should I plant tomatoes?", "Plant them outside after the last frost, when the nights stay above ten degrees."),
        ("How often should I water my houseplants?", "Water most houseplants when the top few centimetres of soil feel dry."),
        ("How do I get rid of slugs in my garden?", "Pick them off in the evening, use beer traps or put copper tape around your pots."),
        ("When is the best time to mow the lawn?", "Mow in the late morning or early evening, when the grass is dry."),
        ("How do I grow herbs indoors?", "Give them a sunny windowsill and well-drained pots, and water only when the soil is dry."),
        ("What can I put in my compost?", "Fruit and vegetable scraps, coffee grounds, eggshells, leaves and grass cuttings can all go in."),
        ("Why are the leaves on my plant turning yellow?", "Overwatering is the most common cause, so let the soil dry out between waterings."),
        ("How deep should I plant bulbs?", "Plant bulbs about three times as deep as they are tall."),
        ("When should I prune roses?", "Prune most roses in late winter or early spring, just before new growth starts."),
        ("How do I start a vegetable garden?", "Choose a sunny spot, improve the soil with compost and start with easy crops like lettuce and beans."),
    ],
    "astronomy": [
        ("How far away is the Moon?", "The Moon is about 384,000 kilometres from the Earth."),
        ("Why does the Moon change shape?", "We see different parts of its sunlit side as it travels around the Earth."),
        ("What is a black hole?", "It is a region of space where gravity is so strong that not even light can escape."),
        ("How many planets are in our solar system?", "There are eight planets in our solar system."),
        ("What is a shooting star?", "It is a small piece of space rock burning up as it enters the Earth's atmosphere."),
        ("Which planet is the hottest?", "Venus is the hottest planet, because its thick atmosphere traps heat."),
        ("How old is the universe?", "The universe is about 13.8 billion years old."),
        ("Can I see the International Space Station from Earth?", "Yes, it looks like a bright moving star shortly after sunset or before sunrise."),
        ("What is a light year?", "It is the distance light travels in one year, about 9.5 trillion kilometres."),
        ("Why do stars twinkle?", "Their light is bent by moving layers of air in the Earth's atmosphere."),
    ],
    "music": [
        ("How do I tune a guitar?", "Use a clip-on tuner and turn each peg until the string matches E, A, D, G, B and E."),
        ("How many keys does a piano have?", "A standard piano has 88 keys."),
        ("What is a major chord?", "It is three notes: the root, the major third above it and the fifth."),
        ("How long does it take to learn the piano?", "Simple songs take a few months of practice; playing well takes several years."),
        ("Who composed The Four Seasons?", "The Four Seasons was composed by Antonio Vivaldi."),
        ("What is the difference between a violin and a viola?", "A viola is slightly larger and tuned a fifth lower than a violin."),
        ("How can I improve my singing voice?", "Warm up, breathe from your diaphragm and practise a little every day."),
        ("What does tempo mean in music?", "Tempo is the speed of a piece, usually measured in beats per minute."),
        ("How many strings does a bass guitar have?", "Most bass guitars have four strings."),
        ("What is a good first instrument for a child?", "The ukulele, the recorder or a small keyboard are easy and cheap to start with."),
    ],
}
# fmt: on

# Token costs of the invented names (SmolLM2's tokenizer splits them into pieces); other words count 1.
_NAME_TOKENS = {"brambleholt": 5, "ostervale": 4, "oyelaran": 4, "halvik": 3, "tannery": 2, "dallow": 2, "sorbell": 3}
_PIECE = re.compile(r"'(?:s|t|re|ve|m|ll|d)\b|[A-Za-z]+|\d|[^\w\s]")  # 's, 't, 'm...: one token


def est_tokens(text: str) -> int:
    """A stand-in for SmolLM2's token count (the generator uses the standard library only): digits and
    punctuation are one token each, a space before a digit is one, common words and contractions ('s, 't)
    one, long words two."""
    n = len(re.findall(r" \d", text))
    for piece in _PIECE.findall(text):
        word = piece.lower()
        if word in _NAME_TOKENS:
            n += _NAME_TOKENS[word]
        else:
            n += 2 if piece.isalpha() and len(piece) > 9 else 1
    return n


def _closest(pool: list[str], target: str, rng: random.Random, k: int = 1, tolerance: int = 2) -> list[str]:
    """`k` texts drawn from those of `pool` within `tolerance` estimated tokens of `target`'s length (at
    least the `k + 1` nearest): drawing among several keeps the phrasings varied."""
    n = est_tokens(target)
    ranked = sorted(pool, key=lambda t: (abs(est_tokens(t) - n), t))
    near = [t for t in ranked if abs(est_tokens(t) - n) <= tolerance]
    return rng.sample(near if len(near) > k else ranked[: k + 1], k)


def _rejected(kind: str, chosen: str, fact: str, topic: str, rng: random.Random) -> str:
    if kind == "wrong_fact":
        return chosen.replace(fact, WRONG_FACTS[topic])
    pool = {"filler": FILLERS, "hedge": HEDGES, "needless_decline": DECLINES}[kind]
    return _closest(pool, chosen, rng)[0]


def _row(prompt: str, chosen: str, rejected: str, kind: str, topic: str) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "kind": kind, "topic": topic}


def in_domain_rows(qa_splits: dict[str, list[dict]], answers: dict[str, list[str]], rng: random.Random) -> dict:
    """One pair per quickstart question, in the same split as quickstart.

    The rejected kind rotates through IN_DOMAIN_KINDS, so each kind is about a quarter of every split;
    chosen is one of the fact's quickstart answers (rotating too)."""
    out: dict[str, list[dict]] = {}
    turn = 0
    for split, rows in qa_splits.items():
        out[split] = []
        for row in rows:
            kind = IN_DOMAIN_KINDS[turn % len(IN_DOMAIN_KINDS)]
            options = answers[row["topic"]]
            chosen = options[turn % len(options)]
            turn += 1
            rejected = _rejected(kind, chosen, row["fact"], row["topic"], rng)
            out[split].append(_row(row["question"], chosen, rejected, kind, row["topic"]))
    return out


def out_of_domain_rows(rng: random.Random) -> dict[str, list[dict]]:
    """Per category: shuffled questions, OOD_TRAIN to train (twice, with two different declines),
    OOD_VAL to validation and the rest to test; the TEST_ONLY categories go to test whole."""
    out: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for category, pairs in OUT_OF_DOMAIN.items():
        items = list(pairs)
        rng.shuffle(items)
        if category in TEST_ONLY:
            parts = {"train": [], "validation": [], "test": items}
        else:
            parts = {
                "train": items[:OOD_TRAIN],
                "validation": items[OOD_TRAIN : OOD_TRAIN + OOD_VAL],
                "test": items[OOD_TRAIN + OOD_VAL :],
            }
        for split, chunk in parts.items():
            for question, attempt in chunk:
                k = OOD_TRAIN_PAIRS if split == "train" else 1
                for decline in _closest(DECLINES, attempt, rng, k):
                    out[split].append(_row(question, decline, attempt, OOD_KIND, category))
    return out


def build(qa_splits: dict[str, list[dict]], answers: dict[str, list[str]], seed: int) -> dict[str, list[dict]]:
    """The preference splits: in-domain rows from the quickstart split, then out-of-domain rows;
    train is shuffled, validation and test keep that order."""
    validate()
    rng = random.Random(seed)
    inside = in_domain_rows(qa_splits, answers, rng)
    outside = out_of_domain_rows(rng)
    splits = {split: inside[split] + outside[split] for split in ("train", "validation", "test")}
    rng.shuffle(splits["train"])
    return splits


def normalize(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def validate() -> None:
    """The authored tables hold together (checked before anything is written)."""
    assert set(TEST_ONLY) <= set(OUT_OF_DOMAIN)
    seen: set[str] = set()
    for category, pairs in OUT_OF_DOMAIN.items():
        assert len(pairs) >= OOD_TRAIN + OOD_VAL + 1, f"{category}: too few questions"
        for question, attempt in pairs:
            assert normalize(question) not in seen, f"{category}: duplicate question {question!r}"
            seen.add(normalize(question))
            assert question.isascii() and attempt.isascii(), f"{category}: non-ASCII text in {question!r}"
            assert "library" not in (question + attempt).lower(), f"{category}: about the library: {question!r}"
    for text in DECLINES + FILLERS + HEDGES:
        assert text.isascii(), text
    for topic, wrong in WRONG_FACTS.items():
        assert wrong.isascii() and "@" not in wrong or wrong.endswith("@brambleholt.org"), (topic, wrong)


def jsonl_rows(rows: list[dict]) -> list[dict]:
    return [{k: r[k] for k in FIELDS} for r in rows]
