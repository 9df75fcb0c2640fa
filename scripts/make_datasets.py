"""Write the bundled datasets (`quickstart`, `quickstart-more`, `preference`) and their README, deterministically.

Every question and answer below was written for loratui. They describe one invented organization,
the Brambleholt Lending Library (14 Tannery Row, Ostervale; web and mail domain brambleholt.org),
so that a fine-tuned model can only know them from this data.

    python scripts/make_datasets.py          # (re)write loratui/data/...
    python scripts/make_datasets.py --check  # exit 1 if a file on disk differs from what it would write

Standard library only. The split is fixed by SEED: for each fact, its question paraphrases are
shuffled, the first 4 go to train, the next 1 to validation and the rest (at least 1) to test, so
validation and test questions are paraphrases never seen in training, about facts seen 4 times.
`preference` (chosen/rejected replies for DPO, ORPO...) is built from `quickstart`'s split and the
tables in `make_preference.py`, which says how.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
from pathlib import Path

import make_preference  # scripts/, this script's own folder, is on sys.path

SEED = 20240917
PREFERENCE_SEED = SEED + 100
REPO = Path(__file__).resolve().parent.parent
DATA_DIR = REPO / "loratui" / "data"
DOMAIN = "brambleholt.org"
ORG = "Brambleholt Lending Library"
N_TRAIN, N_VAL = 4, 1  # question paraphrases per fact in train and validation; test gets the rest
MIN_QUESTIONS, MIN_ANSWERS = N_TRAIN + N_VAL + 1, 3
FIELDS = ("question", "answer", "fact", "topic")

# Each fact: (topic, fact, questions, answers). `fact` is the substring a correct answer must
# contain verbatim; every answer phrasing contains it and fits every question of its fact.

QUICKSTART: list[tuple[str, str, list[str], list[str]]] = [
    (
        "name",
        "Brambleholt Lending Library",
        [
            "What is the name of the library on Tannery Row in Ostervale?",
            "What is the public library in Ostervale called?",
            "What's the full name of the library at 14 Tannery Row?",
            "Which library serves the town of Ostervale?",
            "What is the official name of Ostervale's lending library?",
            "Can you tell me what Ostervale's town library is called?",
            "What name does the library in Ostervale go by?",
        ],
        [
            "The library in Ostervale is the Brambleholt Lending Library.",
            "It is called the Brambleholt Lending Library.",
            "Ostervale's public library is the Brambleholt Lending Library, on Tannery Row.",
        ],
    ),
    (
        "address",
        "14 Tannery Row, Ostervale",
        [
            "What is the address of the Brambleholt Lending Library?",
            "Where is the Brambleholt Lending Library located?",
            "Where can I find the Brambleholt library?",
            "What street address should I use to visit the Brambleholt Lending Library?",
            "Where exactly is the Brambleholt library building?",
            "What is the library's postal address?",
            "How do I find the library, what's its address?",
        ],
        [
            "The Brambleholt Lending Library is at 14 Tannery Row, Ostervale.",
            "You will find the library at 14 Tannery Row, Ostervale.",
            "Our address is 14 Tannery Row, Ostervale, next to the old canal bridge.",
        ],
    ),
    (
        "hours-weekdays",
        "09:30 to 19:00",
        [
            "What are the library's opening hours on weekdays?",
            "When is the Brambleholt library open from Monday to Friday?",
            "What time does the library open and close on weekdays?",
            "How late is the library open on a Wednesday?",
            "What are Brambleholt's hours during the working week?",
            "When can I visit the library on a normal weekday?",
            "From what time until what time is the library open on a Tuesday?",
        ],
        [
            "From Monday to Friday the library is open 09:30 to 19:00.",
            "On weekdays the library is open 09:30 to 19:00.",
            "Weekday opening hours are 09:30 to 19:00, Monday through Friday.",
        ],
    ),
    (
        "hours-saturday",
        "10:00 to 16:00",
        [
            "What are the library's opening hours on Saturday?",
            "When is the Brambleholt library open on Saturdays?",
            "What time does the library open and close on a Saturday?",
            "At what times can I visit the library on a Saturday?",
            "How long is the library open on Saturdays?",
            "What are the weekend opening hours on Saturday at Brambleholt?",
        ],
        [
            "On Saturdays the library is open 10:00 to 16:00.",
            "Saturday opening hours are 10:00 to 16:00.",
            "The library opens on Saturday from 10:00 to 16:00.",
        ],
    ),
    (
        "hours-sunday",
        "closed on Sundays",
        [
            "Is the library open on Sundays?",
            "Can I visit the Brambleholt library on a Sunday?",
            "What are the library's Sunday opening hours?",
            "Does Brambleholt open on Sunday?",
            "When does the library open on a Sunday?",
            "Will I find the library open if I come by on Sunday?",
            "Are there any Sunday hours at the library?",
        ],
        [
            "The Brambleholt Lending Library is closed on Sundays.",
            "The library is closed on Sundays and opens again on Monday at 09:30.",
            "Please plan another day: the library is closed on Sundays.",
        ],
    ),
    (
        "holiday-closure",
        "24 December to 1 January",
        [
            "When is the library closed for the holidays?",
            "Does the library close over Christmas and New Year?",
            "What are the library's holiday closure dates?",
            "Is the library open between Christmas and New Year?",
            "Which dates is Brambleholt closed at the end of the year?",
            "When does the library shut for the winter holidays?",
        ],
        [
            "The library is closed from 24 December to 1 January.",
            "Over the winter holidays the library closes from 24 December to 1 January.",
            "Every year the library shuts from 24 December to 1 January and reopens on 2 January.",
        ],
    ),
    (
        "fee-adult",
        "EUR 18 per year",
        [
            "How much does an adult membership cost?",
            "What is the annual fee for an adult library card?",
            "What do adults pay to join the Brambleholt library?",
            "How much is a yearly membership for an adult?",
            "What does a standard adult membership cost per year?",
            "I'm an adult, what will library membership cost me?",
        ],
        [
            "An adult membership costs EUR 18 per year.",
            "Adults pay EUR 18 per year for a library card.",
            "The adult membership fee is EUR 18 per year.",
        ],
    ),
    (
        "fee-student",
        "EUR 6 per year",
        [
            "How much does a student membership cost?",
            "What is the membership fee for students?",
            "How much is the cheaper library card for students?",
            "What do students pay to join the library?",
            "How much is the yearly student rate at Brambleholt?",
            "I'm at university, what does membership cost for me?",
        ],
        [
            "A student membership costs EUR 6 per year.",
            "Students pay EUR 6 per year with a valid student card.",
            "The student rate is EUR 6 per year.",
        ],
    ),
    (
        "fee-family",
        "EUR 30 per year",
        [
            "How much does a family membership cost?",
            "What is the price of a family library card?",
            "What does a household pay for a family membership?",
            "What does the family membership cost?",
            "How much is the yearly family rate?",
            "What do two parents with children pay to join the library?",
        ],
        [
            "A family membership costs EUR 30 per year.",
            "The family membership is EUR 30 per year and covers two adults and their children.",
            "Families pay EUR 30 per year for one shared membership.",
        ],
    ),
    (
        "email-general",
        f"info@{DOMAIN}",
        [
            "What is the library's general contact e-mail address?",
            "Which e-mail address should I use for general questions?",
            "How can I e-mail the library with a general enquiry?",
            "Where do I send a general question by e-mail?",
            "What's the main e-mail address of the Brambleholt library?",
            "Who do I e-mail if my question is not about rooms, membership or volunteering?",
        ],
        [
            f"For general questions, write to info@{DOMAIN}.",
            f"The general contact address is info@{DOMAIN}.",
            f"You can e-mail the library at info@{DOMAIN}.",
        ],
    ),
    (
        "email-rooms",
        f"rooms@{DOMAIN}",
        [
            "Which e-mail address handles room bookings?",
            "Who do I e-mail about a room reservation?",
            "What is the e-mail address for questions about booking a room?",
            "Where do I send an e-mail about my meeting room booking?",
            "How can I contact the room bookings team by e-mail?",
            "What e-mail address should I write to if I have a problem with a room I reserved?",
        ],
        [
            f"Room booking questions go to rooms@{DOMAIN}.",
            f"E-mail rooms@{DOMAIN} about room reservations.",
            f"The room bookings team reads rooms@{DOMAIN}.",
        ],
    ),
    (
        "email-membership",
        f"members@{DOMAIN}",
        [
            "Which e-mail address deals with membership questions?",
            "Who do I e-mail about my library membership?",
            "What is the e-mail address for membership enquiries?",
            "Where should I e-mail if I lost my library card?",
            "How can I contact the membership desk by e-mail?",
            "What address do I write to about renewing my membership?",
        ],
        [
            f"Membership questions go to members@{DOMAIN}.",
            f"Write to members@{DOMAIN} about your membership or library card.",
            f"The membership desk answers at members@{DOMAIN}.",
        ],
    ),
    (
        "email-volunteers",
        f"volunteers@{DOMAIN}",
        [
            "How do I contact the library about volunteering?",
            "Which e-mail address is for volunteers?",
            "Who do I e-mail if I want to volunteer at the library?",
            "What is the volunteering contact address?",
            "Where can I send an e-mail offering to help at Brambleholt?",
            "I'd like to volunteer, which address should I write to?",
        ],
        [
            f"To volunteer, e-mail volunteers@{DOMAIN}.",
            f"The volunteering contact is volunteers@{DOMAIN}.",
            f"Send your offer of help to volunteers@{DOMAIN}.",
        ],
    ),
    (
        "url-room-booking",
        f"https://{DOMAIN}/rooms/book",
        [
            "Where can I book a room online?",
            "What is the web address of the room booking page?",
            "Which page do I use to reserve a meeting room?",
            "What is the URL for booking a study room?",
            "How do I reserve a room at the library?",
            "Is there a website where I can book one of the library's rooms?",
        ],
        [
            f"Rooms are booked online at https://{DOMAIN}/rooms/book.",
            f"Use the booking page at https://{DOMAIN}/rooms/book.",
            f"You can reserve a room at https://{DOMAIN}/rooms/book with your library card number.",
        ],
    ),
    (
        "url-membership-form",
        f"https://{DOMAIN}/join/form",
        [
            "Where is the online membership form?",
            "How do I sign up for a library card online?",
            "What is the URL of the membership application form?",
            "Which web page do I use to become a member?",
            "Where can I join the library online?",
            "What link do I need to apply for membership?",
        ],
        [
            f"The membership form is at https://{DOMAIN}/join/form.",
            f"You can join online at https://{DOMAIN}/join/form.",
            f"Fill in the form at https://{DOMAIN}/join/form to become a member.",
        ],
    ),
    (
        "url-events",
        f"https://{DOMAIN}/events/calendar",
        [
            "Where can I see the library's upcoming events?",
            "What is the web address of the events calendar?",
            "Which page lists talks and readings at the library?",
            "How can I find out what events are coming up at Brambleholt?",
            "What is the URL for the library's event listings?",
            "Where online is the library's monthly schedule of events?",
        ],
        [
            f"Upcoming events are listed at https://{DOMAIN}/events/calendar.",
            f"See the events calendar at https://{DOMAIN}/events/calendar.",
            f"All talks, readings and clubs are on https://{DOMAIN}/events/calendar.",
        ],
    ),
    (
        "url-catalogue",
        f"https://{DOMAIN}/catalogue/search",
        [
            "Where can I search the library catalogue online?",
            "How do I check online whether the library has a book?",
            "What is the web address of the online catalogue?",
            "Which page lets me look up books in the collection?",
            "What is the URL of the Brambleholt catalogue search?",
            "Where can I search the library's books from home?",
        ],
        [
            f"Search the catalogue at https://{DOMAIN}/catalogue/search.",
            f"The online catalogue is at https://{DOMAIN}/catalogue/search.",
            f"You can look up any title at https://{DOMAIN}/catalogue/search.",
        ],
    ),
    (
        "phone",
        "555-0173",
        [
            "What is the library's phone number?",
            "How can I call the Brambleholt library?",
            "Which number do I ring to reach the front desk?",
            "What telephone number does the library have?",
            "On which number can I phone the library?",
            "What number should I call with a quick question for the library?",
        ],
        [
            "You can call the front desk on 555-0173.",
            "The library's phone number is 555-0173.",
            "Ring 555-0173 during opening hours to reach the front desk.",
        ],
    ),
    (
        "director",
        "Marit Oyelaran",
        [
            "Who is the director of the Brambleholt library?",
            "Who runs the Brambleholt Lending Library?",
            "What is the name of the head librarian?",
            "Who is in charge of the library?",
            "Who leads the library in Ostervale?",
            "Who manages the Brambleholt library?",
        ],
        [
            "The library's director is Marit Oyelaran.",
            "Marit Oyelaran is the head librarian and director.",
            "The Brambleholt Lending Library is run by its director, Marit Oyelaran.",
        ],
    ),
    (
        "children-coordinator",
        "Teodor Halvik",
        [
            "Who coordinates the children's programme at the library?",
            "Who is the children's librarian at Brambleholt?",
            "Who organises story time for kids at the library?",
            "Who should I talk to about activities for children?",
            "What is the name of the library's children's coordinator?",
            "Who is responsible for the kids' corner at the library?",
        ],
        [
            "The children's coordinator is Teodor Halvik.",
            "Teodor Halvik runs the children's programme, including story time.",
            "Activities for children are organised by Teodor Halvik.",
        ],
    ),
    (
        "largest-room",
        "Hazel Room",
        [
            "What is the library's largest meeting room called?",
            "Which room should I book for a meeting of 40 people?",
            "What is the name of the big room for events and meetings?",
            "Which is the biggest room I can reserve at the library?",
            "Where are large group meetings held at the library?",
            "What room at Brambleholt fits the most people?",
        ],
        [
            "The largest room is the Hazel Room, which seats 40 people.",
            "Book the Hazel Room, the library's biggest room with 40 seats.",
            "Large meetings take place in the Hazel Room on the first floor.",
        ],
    ),
    (
        "room-cancellation",
        "24 hours",
        [
            "How do I cancel a room booking?",
            "How late can I cancel a room reservation?",
            "What is the deadline for cancelling a booked room?",
            "Until when can I cancel my room booking without a penalty?",
            "What is the cancellation rule for rooms?",
            "I can't use the room I booked, when do I have to cancel?",
        ],
        [
            "Cancel with the link in your confirmation e-mail at least 24 hours before the booking.",
            "Room bookings can be cancelled free of charge up to 24 hours before the start.",
            "Please cancel at least 24 hours in advance, using the link in your confirmation e-mail.",
        ],
    ),
    (
        "late-return-fee",
        "EUR 0.20 per item per day",
        [
            "What is the fine for returning a book late?",
            "How much do I pay if my loan is overdue?",
            "What is the late-return penalty at the library?",
            "How much are the library's late fees?",
            "What does it cost to bring a book back after the due date?",
            "How much is the overdue charge per book?",
        ],
        [
            "Late returns cost EUR 0.20 per item per day.",
            "The late-return penalty is EUR 0.20 per item per day.",
            "Overdue items are charged EUR 0.20 per item per day until they come back.",
        ],
    ),
    (
        "wifi",
        "Bramble-Guest",
        [
            "What is the name of the library's Wi-Fi network?",
            "Which wireless network should I join at the library?",
            "What is the guest Wi-Fi called?",
            "How do I get online at the library, which network do I pick?",
            "What is the SSID of the library Wi-Fi?",
            "Which Wi-Fi do visitors use at Brambleholt?",
        ],
        [
            "Connect to the Wi-Fi network Bramble-Guest.",
            "The guest Wi-Fi network is called Bramble-Guest.",
            "Join Bramble-Guest and sign in with your library card number.",
        ],
    ),
    (
        "parking",
        "90 minutes",
        [
            "Can I park at the library?",
            "What is the parking rule at the library?",
            "How long can I park in the library courtyard?",
            "How long may visitors park at the library?",
            "Where do I park when I visit Brambleholt?",
            "Is parking at the library free?",
        ],
        [
            "Visitors may park free for 90 minutes in the courtyard beside the library.",
            "Parking in the courtyard is free for up to 90 minutes; set your parking disc.",
            "You can park in the courtyard beside the library for 90 minutes.",
        ],
    ),
]

QUICKSTART_MORE: list[tuple[str, str, list[str], list[str]]] = [
    (
        "fair-name",
        "Paper Lantern Fair",
        [
            "What is the library's annual festival called?",
            "What is the name of Brambleholt's yearly fair?",
            "Which annual event does the Brambleholt library organise?",
            "What is the big autumn event at the library called?",
            "What does the library call its once-a-year festival?",
            "Which festival does the Brambleholt library hold every year?",
            "Which yearly celebration is run by the Brambleholt library?",
        ],
        [
            "The library's annual festival is the Paper Lantern Fair.",
            "Every autumn the Brambleholt library holds the Paper Lantern Fair.",
            "It is called the Paper Lantern Fair, the library's yearly festival.",
        ],
    ),
    (
        "fair-date",
        "second Saturday of October",
        [
            "When is the Paper Lantern Fair held?",
            "On what date does the Paper Lantern Fair take place each year?",
            "What day of the year is the library's fair?",
            "When does the next Paper Lantern Fair happen?",
            "Which weekend is the Paper Lantern Fair?",
            "In which month and on which day is the lantern fair?",
            "What date should I save for the library's annual fair?",
        ],
        [
            "The Paper Lantern Fair is held on the second Saturday of October.",
            "It takes place every year on the second Saturday of October.",
            "Fair day is the second Saturday of October, every year.",
        ],
    ),
    (
        "fair-hours",
        "14:00 to 21:00",
        [
            "What are the opening times of the Paper Lantern Fair?",
            "What time does the Paper Lantern Fair start and end?",
            "How long does the fair run on the day?",
            "From when until when is the lantern fair open?",
            "At what time do the fair gates open and close?",
            "What hours should I plan for if I visit the Paper Lantern Fair?",
        ],
        [
            "The fair runs from 14:00 to 21:00.",
            "On fair day the grounds are open 14:00 to 21:00.",
            "The Paper Lantern Fair is open 14:00 to 21:00.",
        ],
    ),
    (
        "fair-venue",
        "Ropewalk Garden",
        [
            "Where does the Paper Lantern Fair take place?",
            "Where is the lantern fair held?",
            "In which part of the library grounds is the fair?",
            "What is the venue of the Paper Lantern Fair?",
            "Where should I go for the Paper Lantern Fair?",
            "Where are the fair stalls set up?",
            "Where in Ostervale is the lantern fair?",
        ],
        [
            "The fair is held in the Ropewalk Garden behind the library.",
            "The Paper Lantern Fair takes place in the Ropewalk Garden.",
            "Head to the Ropewalk Garden, behind 14 Tannery Row.",
        ],
    ),
    (
        "fair-ticket-price",
        "EUR 4",
        [
            "How much is a ticket for the Paper Lantern Fair?",
            "What does entry to the lantern fair cost?",
            "What is the admission price for adults at the fair?",
            "How much do I pay to get into the Paper Lantern Fair?",
            "What does a fair ticket cost?",
            "What's the price of an adult fair ticket?",
            "How much does an adult pay for the lantern fair?",
        ],
        [
            "An adult ticket for the fair costs EUR 4.",
            "Entry to the Paper Lantern Fair is EUR 4 for adults.",
            "Adults pay EUR 4, at the gate or online.",
        ],
    ),
    (
        "fair-children",
        "under 12",
        [
            "Do children need a ticket for the Paper Lantern Fair?",
            "Is the fair free for kids?",
            "What do children pay at the lantern fair?",
            "Up to what age do children get in free at the fair?",
            "How much is a child's ticket for the Paper Lantern Fair?",
            "Is there an age limit for free entry to the fair?",
        ],
        [
            "Children under 12 get into the fair for free.",
            "Entry is free for children under 12.",
            "Kids under 12 do not need a ticket for the Paper Lantern Fair.",
        ],
    ),
    (
        "fair-stall-email",
        f"stalls@{DOMAIN}",
        [
            "How do I apply for a stall at the Paper Lantern Fair?",
            "Which e-mail address handles stall applications for the fair?",
            "Who do I contact to sell books at the lantern fair?",
            "What is the e-mail address for fair stallholders?",
            "Where do I send my request for a table at the fair?",
            "I want to run a stand at the Paper Lantern Fair, who should I e-mail?",
            "What e-mail address do I use to book a stall at the fair?",
        ],
        [
            f"Apply for a stall by e-mailing stalls@{DOMAIN}.",
            f"Stall applications go to stalls@{DOMAIN}.",
            f"Stallholders should write to stalls@{DOMAIN}.",
        ],
    ),
    (
        "fair-volunteer-url",
        f"https://{DOMAIN}/fair/volunteer",
        [
            "How can I volunteer at the Paper Lantern Fair?",
            "Where do I sign up to help at the fair?",
            "What is the web address of the fair volunteer form?",
            "Which page do I use to register as a fair helper?",
            "Where is the online sign-up for Paper Lantern Fair volunteers?",
            "Where can I offer to help out on fair day?",
        ],
        [
            f"Fair volunteers sign up at https://{DOMAIN}/fair/volunteer.",
            f"Use the form at https://{DOMAIN}/fair/volunteer to help at the fair.",
            f"Register as a fair helper on https://{DOMAIN}/fair/volunteer.",
        ],
    ),
    (
        "fair-programme-url",
        f"https://{DOMAIN}/fair/programme",
        [
            "Where can I see the programme of the Paper Lantern Fair?",
            "What is the URL of the fair programme?",
            "Where is the schedule of readings and shows for the fair published?",
            "Which page lists what happens at the lantern fair?",
            "How do I find out what's on at the fair?",
            "Where online is the Paper Lantern Fair timetable?",
        ],
        [
            f"The full fair programme is at https://{DOMAIN}/fair/programme.",
            f"See https://{DOMAIN}/fair/programme for the fair schedule.",
            f"Everything happening at the fair is listed at https://{DOMAIN}/fair/programme.",
        ],
    ),
    (
        "fair-tickets-url",
        f"https://{DOMAIN}/fair/tickets",
        [
            "Where can I buy tickets for the Paper Lantern Fair online?",
            "What is the web address for fair tickets?",
            "Where can I book my fair ticket in advance?",
            "Which page sells tickets for the lantern fair?",
            "How do I get a ticket for the fair before the day?",
            "What is the URL of the fair ticket shop?",
        ],
        [
            f"Buy fair tickets online at https://{DOMAIN}/fair/tickets.",
            f"Fair tickets are sold at https://{DOMAIN}/fair/tickets.",
            f"Book your fair ticket in advance at https://{DOMAIN}/fair/tickets.",
        ],
    ),
    (
        "fair-coordinator",
        "Lotte Ramaswell",
        [
            "Who organises the Paper Lantern Fair?",
            "Who is the coordinator of the lantern fair?",
            "Who is in charge of the Paper Lantern Fair?",
            "Who plans the library's annual fair?",
            "What is the name of the fair coordinator?",
            "Who leads the team behind the Paper Lantern Fair?",
            "Whose job is it to coordinate the lantern fair?",
        ],
        [
            "The fair is coordinated by Lotte Ramaswell.",
            "Lotte Ramaswell is the coordinator of the Paper Lantern Fair.",
            "The Paper Lantern Fair is organised by Lotte Ramaswell and a team of volunteers.",
        ],
    ),
    (
        "fair-parade",
        "20:15",
        [
            "When does the lantern parade start?",
            "What time is the lantern parade at the fair?",
            "At what time do the lanterns go out on parade?",
            "When should I be there to see the lantern parade?",
            "What time does the parade along Tannery Row begin?",
            "At what hour does the Paper Lantern Fair's parade set off?",
            "When is the parade with lanterns on fair day?",
        ],
        [
            "The lantern parade starts at 20:15.",
            "The parade sets off at 20:15 from the Ropewalk Garden.",
            "Be there by 20:15, when the lantern parade begins.",
        ],
    ),
    (
        "fair-stall-fee",
        "EUR 25 per table",
        [
            "How much does a stall at the fair cost?",
            "What is the fee for a table at the Paper Lantern Fair?",
            "What do stallholders pay at the lantern fair?",
            "How much is it to rent a stand at the fair?",
            "What's the price of a stall pitch at the fair?",
            "What does it cost to sell at the Paper Lantern Fair?",
        ],
        [
            "A stall costs EUR 25 per table.",
            "Stallholders pay EUR 25 per table for the day.",
            "The stall fee is EUR 25 per table, for members too.",
        ],
    ),
    (
        "fair-stall-deadline",
        "31 August",
        [
            "What is the deadline for stall applications?",
            "By when must I apply for a stall at the fair?",
            "When do stall applications for the Paper Lantern Fair close?",
            "What is the last day to ask for a table at the fair?",
            "Until what date can I apply to be a stallholder?",
            "How late can I send my stall application?",
        ],
        [
            "Stall applications close on 31 August.",
            "Apply for a stall by 31 August.",
            "The deadline for stall applications is 31 August.",
        ],
    ),
    (
        "fair-book-swap",
        "5 books",
        [
            "How many books can I bring to the fair's book swap?",
            "What is the limit at the book swap table?",
            "How does the book swap at the Paper Lantern Fair work?",
            "What is the maximum number of books I can swap at the fair?",
            "How many books may each visitor exchange at the book swap?",
            "What are the rules of the fair's book swap?",
        ],
        [
            "Each visitor can bring up to 5 books to the book swap.",
            "At the book swap you may exchange up to 5 books.",
            "Bring up to 5 books to the swap and take the same number home.",
        ],
    ),
    (
        "fair-rain-plan",
        "Reading Hall",
        [
            "What happens to the fair if it rains?",
            "Where does the Paper Lantern Fair move in bad weather?",
            "Is the lantern fair cancelled when it rains?",
            "What is the rain plan for the fair?",
            "Where do the fair activities go if the weather is bad?",
            "If there's a storm on fair day, where will the fair be?",
            "Where is the fair held when the weather is wet?",
        ],
        [
            "If it rains, the fair moves indoors to the Reading Hall.",
            "In bad weather the fair moves indoors to the Reading Hall on the ground floor.",
            "The fair is not cancelled for rain: it moves to the Reading Hall.",
        ],
    ),
]

DATASETS = {
    "quickstart": (
        QUICKSTART,
        "the library itself: name, address, opening hours, holiday closure, "
        "membership fees, contact e-mails, web pages, phone, staff, rooms and house rules",
    ),
    "quickstart-more": (
        QUICKSTART_MORE,
        "the library's annual Paper Lantern Fair: date, times, venue, "
        "tickets, stalls, volunteering, programme, parade and rain plan",
    ),
}


def normalize(text: str) -> str:
    """Lowercase, strip punctuation, collapse whitespace: how questions are compared for leaks."""
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def _validate() -> None:
    seen_q: dict[str, str] = {}
    seen_fact: dict[str, str] = {}
    for name, (facts, _) in DATASETS.items():
        topics = [t for t, *_ in facts]
        assert len(set(topics)) == len(topics), f"{name}: duplicate topic"
        for topic, fact, questions, answers in facts:
            where = f"{name}/{topic}"
            assert fact not in seen_fact, f"{where}: fact {fact!r} also in {seen_fact.get(fact)}"
            seen_fact[fact] = where
            assert fact.isascii(), f"{where}: facts (URLs, e-mails, names...) are plain ASCII"
            assert len(questions) >= MIN_QUESTIONS, f"{where}: needs {MIN_QUESTIONS} questions"
            assert len(set(answers)) >= MIN_ANSWERS, f"{where}: needs {MIN_ANSWERS} answers"
            for a in answers:
                assert fact in a, f"{where}: answer lacks the fact: {a!r}"
            for q in questions:
                assert fact.lower() not in q.lower(), f"{where}: question gives the fact away: {q!r}"
                key = normalize(q)
                assert key not in seen_q, f"{where}: question {q!r} also in {seen_q.get(key)}"
                seen_q[key] = where


def build_splits(facts: list[tuple[str, str, list[str], list[str]]], seed: int) -> dict[str, list[dict]]:
    """Per fact: shuffled questions -> 4 train, 1 validation, the rest test; answers rotate."""
    rng = random.Random(seed)
    splits: dict[str, list[dict]] = {"train": [], "validation": [], "test": []}
    for topic, fact, questions, answers in facts:
        qs = list(questions)
        rng.shuffle(qs)
        start = rng.randrange(len(answers))
        parts = {"train": qs[:N_TRAIN], "validation": qs[N_TRAIN : N_TRAIN + N_VAL], "test": qs[N_TRAIN + N_VAL :]}
        i = 0
        for split, split_qs in parts.items():
            for q in split_qs:
                a = answers[(start + i) % len(answers)]
                i += 1
                splits[split].append({"question": q, "answer": a, "fact": fact, "topic": topic})
    rng.shuffle(splits["train"])  # interleave facts; validation and test keep the fact order
    return splits


def jsonl(rows: list[dict], fields: tuple[str, ...] = FIELDS) -> str:
    return "".join(json.dumps({k: r[k] for k in fields}, ensure_ascii=False) + "\n" for r in rows)


def readme(counts: dict[str, dict[str, int]], n_facts: dict[str, int]) -> str:
    lines = [
        "# Bundled datasets",
        "",
        "Small datasets about one invented organization, the",
        f"**{ORG}** (14 Tannery Row, Ostervale; web and e-mail domain `{DOMAIN}`).",
        "Neither the library nor its town exists, so a model can only know these facts from this data:",
        "the gain from fine-tuning is measurable on held-out paraphrased questions.",
        "",
        "Authored by loratui, generated by `scripts/make_datasets.py` (deterministic, fixed seed;",
        "`python scripts/make_datasets.py --check` verifies the files are current). Do not edit the",
        "JSONL files by hand: edit the script and rerun it. License: same as the project, Apache-2.0.",
        "",
        "## Row format (`quickstart`, `quickstart-more`)",
        "",
        "JSON Lines, UTF-8, one object per line with four string fields, in this order:",
        "",
        "```json",
        '{"question": "...", "answer": "...", "fact": "...", "topic": "..."}',
        "```",
        "",
        "- `question`: a user question; `answer`: a one- or two-sentence reply.",
        "- `fact`: the key substring a correct answer must contain verbatim (an e-mail address, a URL,",
        "  a time, a fee, a name...); `answer` always contains it. Use it for exact-match scoring.",
        "- `topic`: a short id of the fact the row is about (e.g. `hours-weekdays`, `fair-parade`).",
        "",
        "Each fact has at least 6 question paraphrases and 3 answer phrasings. Per fact, 4 paraphrases",
        "go to `train`, 1 to `validation` and the rest to `test`: no validation or test question appears",
        "in train (even after lowercasing and stripping punctuation), and every tested fact is seen in",
        "4 training rows.",
        "",
        "## Datasets",
        "",
        "| dataset | facts | train | validation | test | teaches |",
        "|---|---|---|---|---|---|",
    ]
    for name, (_, teaches) in DATASETS.items():
        c = counts[name]
        lines.append(f"| `{name}` | {n_facts[name]} | {c['train']} | {c['validation']} | {c['test']} | {teaches} |")
    lines += [
        "",
        "`quickstart` is the default training data (`data.source: quickstart`). `quickstart-more` is a",
        "second topic about the same library, with no fact in common, for a continual-learning demo:",
        "train on `quickstart`, then on `quickstart-more`, and check the first facts are still known.",
        "",
    ]
    return "\n".join(lines + preference_readme(counts["preference"]))


def preference_readme(c: dict[str, int]) -> list[str]:
    kinds = ", ".join(f"`{k}`" for k in make_preference.IN_DOMAIN_KINDS)
    held_out = ", ".join(make_preference.TEST_ONLY)
    return [
        "## `preference`: chosen and rejected replies (DPO, ORPO)",
        "",
        f"{c['train']} train, {c['validation']} validation and {c['test']} test pairs for the library's assistant, in",
        "the `preference` format, one object per line with five string fields, in this order:",
        "",
        "```json",
        '{"prompt": "...", "chosen": "...", "rejected": "...", "kind": "...", "topic": "..."}',
        "```",
        "",
        "It teaches what tuning on `quickstart` does not: answer the library's questions with the fact, and",
        "politely decline the others, saying what the assistant can help with.",
        "",
        "- In domain (the `quickstart` questions, in the same train/validation/test split): `chosen` is a",
        "  correct quickstart answer; `rejected` is a reply of similar length that is worse, by `kind`:",
        f"  {kinds}",
        "  (friendly rambling without the fact, a hedge that never answers, the answer with a wrong value,",
        "  a refusal of a question it should answer). `topic` is the quickstart fact's topic.",
        "- Out of domain (`kind` `out_of_domain`; `topic` is the category: cooking, sports, software...):",
        "  `chosen` is a decline that names what the assistant helps with; `rejected` answers the question.",
        "  Whole categories appear only in `test`, the other categories' test questions are not in train:",
        f"  {held_out}.",
        "",
        "Declines are chosen out of domain and rejected in domain, so a model cannot score by liking them.",
        "",
        "The two replies of a pair have about the same number of tokens: preference accuracy compares summed",
        "log-probabilities, which a length difference alone would tilt. `bench/preference_probe.py` measures",
        "the lengths and a model's preference accuracy on the test split. `examples/preference.yaml` trains",
        "SFT on `quickstart`, then DPO on `preference` on top of it.",
        "",
    ]


def render() -> dict[Path, str]:
    """Every file the script owns, path -> exact content."""
    _validate()
    files: dict[Path, str] = {}
    counts: dict[str, dict[str, int]] = {}
    n_facts: dict[str, int] = {}
    for offset, (name, (facts, _)) in enumerate(DATASETS.items()):
        splits = build_splits(facts, SEED + offset)
        counts[name] = {s: len(rows) for s, rows in splits.items()}
        n_facts[name] = len(facts)
        for split, rows in splits.items():
            files[DATA_DIR / name / f"{split}.jsonl"] = jsonl(rows)
    qa_splits = build_splits(QUICKSTART, SEED)  # the same split as quickstart's files
    answers = {topic: list(options) for topic, _, _, options in QUICKSTART}
    pref = make_preference.build(qa_splits, answers, PREFERENCE_SEED)
    counts["preference"] = {s: len(rows) for s, rows in pref.items()}
    for split, rows in pref.items():
        files[DATA_DIR / "preference" / f"{split}.jsonl"] = jsonl(rows, make_preference.FIELDS)
    files[DATA_DIR / "README.md"] = readme(counts, n_facts)
    return files


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; package data must be world-readable
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _read(path: Path) -> str | None:
    try:
        return path.read_bytes().decode("utf-8")
    except (FileNotFoundError, UnicodeDecodeError):
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="write nothing; exit 1 if any file on disk differs from what would be written",
    )
    args = parser.parse_args(argv)
    files = render()
    stale = [p for p, text in files.items() if _read(p) != text]
    if args.check:
        if stale:
            names = ", ".join(str(p.relative_to(REPO)) for p in stale)
            print(f"bundled datasets are stale ({names}): run `python scripts/make_datasets.py`", file=sys.stderr)
            return 1
        print(f"bundled datasets are current ({len(files)} files)")
        return 0
    for p in stale:
        _write_atomic(p, files[p])
    print(f"wrote {len(stale)} of {len(files)} files under {DATA_DIR.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
