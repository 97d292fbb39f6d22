"""Write `sharegpt-filtered.json`: a small ShareGPT-shaped set of chats written for this project.

The benchmark needs prompts and answers whose token lengths look like ShareGPT's (mean
about 160 in, 340 out, a long tail, most turns short) without shipping anyone's real chats.
Each chat is assembled from the topic sentence banks below with a fixed seed, so reruns
write the same bytes. A handful of hand-written chats cover the shapes a loader must
survive: a reply before the first question, no question at all, an empty list.

Run from the repo root: `python tools/make_sharegpt_sample.py`. The demo tokenizer is trained
on this file, so run `tools/make_demo_tokenizer.py` after it; lengths were tuned with that
tokenizer (CHARS_PER_TOKEN), and tests/test_data.py checks them.
"""
from __future__ import annotations

import json
import math
import random
import re
import string
from dataclasses import dataclass, field
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "sharegpt-filtered.json"
SEED = 20230912
NUM_GENERATED = 600
PROMPT_MEAN_TOKENS, ANSWER_MEAN_TOKENS = 160, 340
# The long tail, in tokens: a few pasted documents and a few very long answers.
PROMPT_TAIL = [1150, 1500, 1900, 2300, 2600]
ANSWER_TAIL = [1600, 1900, 2200, 2450, 2700]
# Characters per token of the demo tokenizer on this text (measured; English prose, some code).
CHARS_PER_TOKEN = 4.6


@dataclass(frozen=True)
class Topic:
    """Sentence banks for one subject; `{slot}` fields are filled once per chat so it stays coherent."""

    slots: dict[str, list[str]]
    asks: list[str]
    context: list[str]
    openers: list[str]
    points: list[str]
    headings: list[str]
    closers: list[str]
    followups: list[str]
    # Extra points that only fit one value of the first slot (facts about one science concept).
    keyed_points: dict[str, list[str]] = field(default_factory=dict)


PROGRAMMING = Topic(
    slots={
        "lang": ["Python", "JavaScript", "Go", "Rust", "TypeScript", "Java"],
        "thing": ["a CSV importer", "a small REST API", "a command-line tool", "a web scraper", "a chat bot",
                  "a log parser", "an inventory tracker", "a budgeting app"],
        "bug": ["it runs out of memory", "it gets slower every hour", "the tests pass locally but fail in CI",
                "it crashes on empty input", "the output has duplicate rows", "it hangs when the network drops"],
        "db": ["SQLite", "PostgreSQL", "MySQL", "Redis"],
        "noun": ["order", "customer", "invoice", "sensor", "ticket", "recipe", "booking"],
    },
    asks=[
        "I'm writing {thing} in {lang} and {bug}. Where should I start looking?",
        "What is the cleanest way to structure {thing} in {lang}?",
        "How do I write unit tests for {thing} that talks to {db}?",
        "Can you explain the difference between a process and a thread, with an example in {lang}?",
        "My {lang} project keeps growing and {bug}. How do I debug this without guessing?",
        "What's a good way to read a large file line by line in {lang} without loading it all into memory?",
        "Should I store {noun} records in {db} or just keep them in JSON files for {thing}?",
        "How do I handle errors properly in {lang}? My code is full of try/except blocks that just print.",
        "Can you review my approach: {thing} in {lang}, one big module, {db} for storage?",
        "What does it mean when people say a function should be pure, and why does it matter?",
    ],
    context=[
        "I've been programming for about two years, mostly small scripts.",
        "The project is {thing} for a friend's small business.",
        "Right now everything lives in one file that is about eight hundred lines long.",
        "I'm using {db} because it was already installed.",
        "The data is a few hundred thousand {noun} rows, so not huge.",
        "I tried adding print statements everywhere but it only made things more confusing.",
        "We deploy it on a cheap virtual machine with one CPU and one gigabyte of RAM.",
        "I read that I should use an ORM, but I'm not sure it is worth it for something this small.",
        "A colleague suggested rewriting it in {lang}, which is why I'm asking about {lang} specifically.",
        "I don't have a lot of time, so I'd prefer changes I can make incrementally.",
        "The problem only shows up after it has been running for a while.",
        "I'm comfortable with the basics but I've never set up proper tests.",
    ],
    openers=[
        "Good question. This is a very common situation, and there is a fairly standard way to approach it.",
        "Sure! Let's break this down into a few manageable pieces.",
        "The short answer is: measure first, then change one thing at a time.",
        "This is a great thing to think about early, before {thing} gets any bigger.",
        "Here is how I would approach it in {lang}.",
    ],
    points=[
        "Start by writing down exactly how to reproduce the problem, even if it takes a few steps.",
        "Split the code into small modules: one for reading input, one for the core logic, and one for output.",
        "Keep functions short enough that you can describe each one in a single sentence.",
        "Write a test for the bug before you fix it, so you know the fix actually works and stays fixed.",
        "Use the profiler that comes with {lang} instead of guessing which part is slow.",
        "Log the size of your main data structures every few minutes; a number that only grows is a strong hint.",
        "Pass the database connection into your functions instead "
        "of creating it inside them, so tests can use a fake one.",
        "For {db}, wrap related writes in a transaction so a crash halfway through does not leave half a {noun}.",
        "Read large files as a stream and process one line at a time; memory then stays flat no matter the file size.",
        "Catch an error only where you can actually do something about it, and let the rest propagate with context.",
        "Give every error message the thing that went wrong and what the user can do about it.",
        "Pin the versions of your dependencies so the code that works today still works next month.",
        "Run the same checks in CI that you run locally, with the same versions, to avoid surprises.",
        "Avoid global state; it makes tests depend on the order they run in.",
        "Name things after what they mean in the problem, like {noun}_total, rather than after their type.",
        "Add type hints to the public functions first; they document intent and catch mistakes early.",
        "When a test is flaky, treat it as a real bug, because it usually is one.",
        "Keep configuration such as file paths and passwords out of the code and read it from the environment.",
        "If two parts of the program need the same data, pass it explicitly rather than reading it twice.",
        "Commit small, working changes often so you can always go back to the last good state.",
        "A pure function returns the same output for the same input "
        "and changes nothing else, which makes it trivial to test.",
        "Threads share memory, which makes them cheap to communicate "
        "with but easy to get wrong; processes are isolated.",
        "Before reaching for a cache, check whether you are doing the same expensive work more than once.",
        "For {thing}, a plain folder layout with a clear entry point goes a long way.",
        "Delete code you no longer need; version control remembers it for you.",
    ],
    headings=["Reproduce it first", "Structure", "Testing", "Error handling", "Performance", "Deployment"],
    closers=[
        "If you share the relevant part of the code, I can give more specific suggestions.",
        "Try the first two steps and let me know what the profiler shows.",
        "Good luck with {thing}! It sounds like a fun project.",
        "Feel free to paste the error message if it still fails.",
    ],
    followups=[
        "That helps, thanks. How would the tests look for the part that talks to {db}?",
        "What would you change first if I only had one afternoon?",
        "Can you show a short example of the error handling you mean?",
        "Is it worth switching from {db} to something else at this size?",
        "Thanks! How do I set that up in CI?",
    ],
)

COOKING = Topic(
    slots={
        "dish": ["lasagna", "banana bread", "chicken curry", "sourdough bread", "crème brûlée",
                 "vegetable soup", "risotto", "pancakes", "lemon tart", "pão de queijo"],
        "ingredient": ["garlic", "onions", "fresh basil", "jalapeño peppers", "brown butter", "miso",
                       "smoked paprika", "lemon zest"],
        "guests": ["four", "six", "eight", "twelve"],
        "problem": ["too dry", "bland", "gummy in the middle", "burnt on the bottom", "too salty", "watery"],
    },
    asks=[
        "How do I make {dish} without it coming out {problem}?",
        "I'm cooking for {guests} people this weekend. Is {dish} a good idea, and how far ahead can I prepare it?",
        "What can I use instead of {ingredient} in {dish}?",
        "My {dish} always turns out {problem}. What am I doing wrong?",
        "Can you give me a simple recipe for {dish}?",
        "How long will {dish} keep in the fridge, and can I freeze it?",
        "What's the difference between baking soda and baking powder?",
        "Any tips for cooking on a budget for {guests} people?",
    ],
    context=[
        "I'm not a very experienced cook, but I can follow a recipe.",
        "My oven runs a little hot, maybe ten degrees or so.",
        "One of my guests is vegetarian and another doesn't eat {ingredient}.",
        "I only have a small kitchen with two burners and a basic oven.",
        "Last time I tried, it tasted fine but the texture was {problem}.",
        "I'd like something I can mostly prepare the day before.",
        "I live at a fairly high altitude, if that matters.",
        "I usually shop once a week, so fresh herbs tend to go bad before I use them.",
        "My family is picky, especially about anything spicy.",
        "I have a stand mixer but I rarely use it.",
    ],
    openers=[
        "Happy to help! This one is very forgiving once you know where it usually goes wrong.",
        "Great choice. Here is what makes the biggest difference.",
        "That usually comes down to a couple of small details.",
        "Sure, here is a simple approach that works well at home.",
    ],
    points=[
        "Measure flour by weight if you can; a cup can vary by twenty percent depending on how you scoop it.",
        "Salt in small amounts as you go rather than all at the end, and taste at every stage.",
        "Let the pan heat fully before adding anything, otherwise food sticks and steams instead of browning.",
        "Add aromatics like {ingredient} at the right moment: most go in "
        "early and gently, bright flavours like zest and herbs near the end.",
        "If the result is {problem}, check the oven temperature with a cheap thermometer before changing the recipe.",
        "Rest baked goods on a rack for at least fifteen minutes; they keep cooking from the inside.",
        "Most stews and curries taste better the next day, so making them ahead is a real advantage.",
        "Cool leftovers quickly and refrigerate them within two hours; they keep for three to four days.",
        "Freeze portions flat in bags so they thaw evenly and take up less space.",
        "Baking soda needs an acid such as yogurt or lemon juice to react; baking powder already contains one.",
        "A squeeze of lemon or a splash of vinegar at the end often fixes a dish that tastes flat.",
        "Chop everything before you start cooking so nothing burns while you hunt for an ingredient.",
        "For {guests} people, double the recipe rather than scaling "
        "it further, and use two pans instead of one crowded one.",
        "Buy whole vegetables and spices in bulk; they are much cheaper than pre-cut or pre-mixed versions.",
        "If you don't have {ingredient}, something with a similar "
        "role works: an aromatic for an aromatic, an acid for an acid.",
        "Stir risotto often but not constantly, and add warm stock a ladle at a time.",
        "Don't overmix batter; a few lumps are fine and keep quick breads tender.",
        "Taste the dish once more just before serving, since flavours change as food cools.",
        "Keep a small notebook of what you changed each time, so you can repeat what worked.",
        "A heavy pan holds heat better and makes browning much easier on a weak stove.",
    ],
    headings=["Ingredients", "Preparation", "Cooking", "Serving", "Storing leftovers", "Common mistakes"],
    closers=[
        "Enjoy the meal, and have fun cooking for your guests!",
        "Let me know how it turns out!",
        "If it still comes out {problem}, tell me your exact steps and I'll help you troubleshoot.",
        "Bon appétit!",
    ],
    followups=[
        "Thanks! Could I make it without an oven?",
        "What side dish would go well with it?",
        "How would I adjust this for a vegetarian guest?",
        "Can I prepare the sauce two days ahead?",
        "What wine or drink would you serve with it?",
    ],
)

TRAVEL = Topic(
    slots={
        "city": ["Lisbon", "Kyoto", "Zürich", "Mexico City", "Kraków", "Reykjavík", "São Paulo", "Edinburgh",
                 "Montréal", "Hanoi"],
        "days": ["three", "four", "five", "seven", "ten"],
        "budget": ["a tight budget", "a moderate budget", "a flexible budget"],
        "season": ["early spring", "the middle of summer", "late autumn", "December"],
        "who": ["my partner", "two kids", "a group of friends", "my parents"],
    },
    asks=[
        "I'm going to {city} for {days} days with {who}. What should we not miss?",
        "Can you plan a {days}-day itinerary for {city} on {budget}?",
        "Is {season} a good time to visit {city}?",
        "What's the best way to get around {city} without a car?",
        "How much cash should I bring to {city}, or can I pay by card everywhere?",
        "What are some day trips from {city} that are easy by train?",
        "Any tips for a long flight with {who}?",
        "What should I pack for {city} in {season}?",
    ],
    context=[
        "We like walking, food markets and museums, but not big crowds.",
        "It's our first trip abroad in a few years, so I'm a little nervous.",
        "We're travelling on {budget} and would rather spend on food than hotels.",
        "We'll arrive in the evening and leave early on the last day.",
        "One of us has bad knees, so very steep hills are a problem.",
        "We don't speak the local language beyond hello and thank you.",
        "We'd like at least one day that is mostly relaxing.",
        "I've read mixed things about the weather in {season}.",
        "We're staying near the centre, in a small apartment.",
        "We usually wake up early and are tired by nine in the evening.",
    ],
    openers=[
        "What a great trip! {city} has a lot to offer in {days} days.",
        "Good news: {city} is very manageable without a car.",
        "Here is a relaxed plan that leaves room for wandering.",
        "Sure! A few practical tips first, then some ideas.",
    ],
    points=[
        "Buy a multi-day public transport pass on arrival; it usually pays for itself by the second day.",
        "Book the one or two museums you really care about in advance, especially on weekends.",
        "Plan one neighbourhood per day so you walk instead of crossing the city back and forth.",
        "Eat lunch where locals work; set lunch menus are often half the price of dinner.",
        "Carry a little cash for markets and small cafés, but cards are widely accepted in {city}.",
        "In {season}, pack layers; mornings and evenings can feel very different from midday.",
        "Comfortable shoes matter more than anything else in your bag.",
        "Keep the first evening free; travel days always take longer than expected.",
        "A day trip by train is a nice break from the city and usually needs no booking outside holidays.",
        "Download an offline map before you leave so you are not relying on mobile data.",
        "Learn five words of the local language; people appreciate the effort even if you switch to English.",
        "If you travel as a group, build in a slow afternoon every couple of days so nobody gets worn out.",
        "Check opening days: many museums close on Mondays or Tuesdays.",
        "Keep copies of your passport and insurance details in your email.",
        "Sunset viewpoints get crowded; arrive thirty minutes early or pick a less famous one nearby.",
        "Tap water is safe in many cities, so bring a refillable bottle and save money.",
        "On {budget}, a room slightly outside the centre near a metro stop is often the best value.",
        "Markets are at their best in the morning, when the stalls are full and it is cooler.",
        "Leave a free half-day at the end for anything you discover along the way.",
        "Travel insurance is worth it for any trip longer than a weekend.",
    ],
    headings=["Getting around", "Where to stay", "Food", "Day by day", "Money", "Packing"],
    closers=[
        "Have a wonderful trip to {city}!",
        "If you tell me which part of the city you're staying in, I can suggest places nearby.",
        "Enjoy, and don't try to see everything: {days} days goes by quickly.",
        "Safe travels! ✈️",
    ],
    followups=[
        "Thanks! Which of those would you skip if it rains?",
        "Is it safe to walk around in the evening?",
        "What food should we definitely try there?",
        "How early should we get to the airport on the way back?",
        "Could you shorten this to a two-day version?",
    ],
)

SCIENCE = Topic(
    slots={
        "concept": ["photosynthesis", "black holes", "the immune system", "plate tectonics", "climate feedback loops",
                    "vaccines", "entropy", "DNA replication", "ocean tides", "the placebo effect"],
        "level": ["a ten-year-old", "a high school student", "someone with no science background",
                  "a first-year university student"],
    },
    asks=[
        "Can you explain {concept} to {level}?",
        "What is the most common misconception about {concept}?",
        "How do scientists actually know what they know about {concept}?",
        "I'm struggling with {concept} in my science class. Can you give me an intuitive picture?",
        "Why does {concept} matter in everyday life?",
        "What would be a simple experiment to demonstrate {concept} at home?",
    ],
    context=[
        "I need to explain it in a short presentation next week.",
        "My textbook uses a lot of equations and I lose the big picture.",
        "I watched a documentary that made it sound simple, but I don't think it is.",
        "My daughter asked me and I realised I couldn't answer.",
        "I'm preparing for an exam and want to check my understanding.",
        "A friend insists the popular explanation is wrong, and now I'm confused.",
        "I prefer analogies to formulas, if possible.",
        "I have a basic idea but can't connect it to the rest of what we learned.",
    ],
    openers=[
        "Great question! It is easier to picture than it sounds.",
        "Let's build it up from the basics.",
        "Here is an intuitive way to think about it, followed by a bit more detail.",
        "Sure. The key idea fits in one sentence, and the rest is detail.",
    ],
    points=[
        "Scientists rarely rely on a single experiment; confidence "
        "comes from many independent measurements that agree.",
        "A good model is not a perfect description of reality but a useful one that makes testable predictions.",
        "For {level}, an analogy helps: think of {concept} as a process with inputs, outputs and rules in between.",
        "Measurements always come with uncertainty, and stating it honestly is part of doing science well.",
        "A common mistake is to confuse correlation with causation; two things can rise together for a third reason.",
        "Simple home experiments, like growing plants in light and shade, show the idea even without lab equipment.",
        "Textbook diagrams simplify a lot, so it is normal if the real picture seems messier.",
        "The same principle often appears in very different settings, which is what makes it powerful.",
        "Peer review catches many errors, but replication by other groups is what really settles a question.",
        "It helps to ask what would have to be true if the idea were wrong, and then look for that evidence.",
    ],
    headings=["The big picture", "How it works", "How we know", "Common misconceptions", "Try it yourself"],
    closers=[
        "I hope that helps! Let me know if any part is still fuzzy.",
        "If you want, I can suggest a short reading list on {concept}.",
        "Good luck with your presentation!",
        "Science is full of ideas like this that get more interesting the closer you look.",
    ],
    followups=[
        "That makes sense. Can you give an even simpler analogy?",
        "How was this discovered in the first place?",
        "What's still unknown about it?",
        "Could you turn that into three slides for my presentation?",
        "How does this connect to other topics in science?",
    ],
    keyed_points={
        "photosynthesis": [
            "Photosynthesis turns light, water and carbon dioxide "
            "into sugar and oxygen, storing energy in chemical bonds.",
            "Chlorophyll absorbs red and blue light and reflects green, which is why leaves look green.",
            "Almost all the oxygen in the air was released by plants, algae and bacteria over billions of years.",
        ],
        "black holes": [
            "A black hole is a region where gravity is so strong that "
            "not even light can escape once it crosses the horizon.",
            "Astronomers detect black holes by watching stars orbit "
            "something invisible and by the glow of gas falling in.",
            "Near a black hole, time runs measurably slower than far away from it.",
        ],
        "the immune system": [
            "The immune system remembers past infections, which is why a second exposure is often much milder.",
            "White blood cells patrol the body and recognise invaders by the shapes of molecules on their surface.",
            "Fever is not a malfunction; a higher temperature makes it harder for many germs to multiply.",
        ],
        "plate tectonics": [
            "Earth's crust is broken into plates that drift a few "
            "centimetres a year, about as fast as fingernails grow.",
            "Earthquakes and volcanoes cluster along plate boundaries, which is how the plates were first mapped.",
            "The matching coastlines and fossils of South America and Africa were early clues that continents move.",
        ],
        "climate feedback loops": [
            "A feedback loop amplifies or dampens a change: melting ice exposes dark water, which absorbs more heat.",
            "Warmer air holds more water vapour, which traps more heat, another amplifying loop.",
            "Some loops push the other way, for example plants growing faster with more carbon dioxide.",
        ],
        "vaccines": [
            "Vaccines train the immune system with a harmless version or a piece of a pathogen.",
            "Because the immune system remembers, a vaccinated body can respond before an infection takes hold.",
            "When most people are immune, a disease struggles to "
            "spread, which protects those who cannot be vaccinated.",
        ],
        "entropy": [
            "Entropy is often described as disorder, but it is better "
            "understood as the number of ways a system can be arranged.",
            "A melting ice cube gains entropy because the molecules of liquid water can be arranged in many more ways.",
            "Living things stay ordered by increasing the entropy of their surroundings, mostly as heat.",
        ],
        "DNA replication": [
            "When DNA is copied, each strand serves as a template, and proofreading enzymes fix most mistakes.",
            "A human cell copies about three billion letters of DNA in a few hours before it divides.",
            "The rare mistakes that slip through are one source of the variation that evolution acts on.",
        ],
        "ocean tides": [
            "Tides come mostly from the Moon's gravity pulling slightly "
            "harder on the near side of Earth than the far side.",
            "Most coasts see two high tides a day because the oceans bulge on both the near and the far side.",
            "When the Sun and Moon line up, their pulls add together and the tides are higher than usual.",
        ],
        "the placebo effect": [
            "The placebo effect is real and measurable, which is "
            "why good trials compare a treatment against a placebo.",
            "Expectation changes how we perceive pain and tiredness, even when nothing else has changed.",
            "In a double-blind trial neither the patients nor the doctors know who gets the real treatment.",
        ],
    },
)

WRITING = Topic(
    slots={
        "piece": ["a cover letter", "a short story", "a wedding toast", "a blog post", "a college essay",
                  "a product description", "a newsletter", "a eulogy"],
        "tone": ["warm", "professional", "funny", "concise", "heartfelt"],
        "reader": ["a hiring manager", "my classmates", "our customers", "my family", "a literary magazine"],
        "name": ["Maya", "Daniel", "Priya", "Tomás", "Elena", "Sam", "Chloé", "Kenji"],
    },
    asks=[
        "Can you help me write {piece} for {reader}? I want it to sound {tone}.",
        "How do I make my writing less wordy?",
        "I have writer's block on {piece}. How do I get started?",
        "What's a good structure for {piece}?",
        "Could you give me feedback on the tone of {piece}? It's for {reader}.",
        "How long should {piece} be?",
        "Write a short poem about autumn for my grandmother's birthday card.",
        "How do I end {piece} without it feeling abrupt?",
    ],
    context=[
        "English isn't my first language, so I worry about sounding stiff.",
        "I tend to write very long sentences and then get lost in them.",
        "The deadline is on Friday.",
        "It should be around one page, maybe a bit less.",
        "I want it to sound {tone} but not over the top.",
        "I've rewritten the first paragraph about ten times.",
        "The audience is {reader}, so I can't use too much jargon.",
        "My friend {name} will read it out loud, so it should flow well when spoken.",
    ],
    openers=[
        "I'd be glad to help! A {tone} tone is very achievable with a few techniques.",
        "Good writing is mostly rewriting, so you're already on the right track.",
        "Here is a structure that works well for {piece}.",
        "Sure. Let's start with the reader and work backwards.",
    ],
    points=[
        "Open with something specific, like a moment or a detail, rather than a general statement.",
        "Write the first draft fast and badly; fixing a page is much easier than filling one.",
        "Cut every word that doesn't change the meaning, then read it again and cut a little more.",
        "Prefer active verbs: 'we launched the project' is stronger than 'the project was launched by us'.",
        "Keep one idea per paragraph and start each paragraph with the point it makes.",
        "Read it out loud; wherever you stumble, the sentence needs work.",
        "Explain any term your readers might not know, or choose a simpler word.",
        "A {tone} tone comes mostly from word choice and rhythm, not from exclamation marks.",
        "Vary sentence length: a short sentence after two long ones lands with extra weight.",
        "End by coming back to the opening image or idea; it gives the piece a sense of closure.",
        "Show, don't tell: instead of saying {name} was nervous, describe their hands fidgeting with a pen.",
        "Ask someone who doesn't know the topic to read it and tell you where they got lost.",
        "Put the draft away for a day before editing; you'll see problems you can't see now.",
        "Use concrete numbers and examples where you can; they are more convincing than adjectives.",
        "Remove the first sentence of your draft and see if the piece is better without it. It often is.",
        "Don't try to say everything; choose the two or three points that matter most to your reader.",
        "Dialogue should sound natural but tighter than real speech, without the ums and small talk.",
        "If a paragraph feels stuck, try writing it as if you were explaining it to a friend over coffee.",
    ],
    headings=["Opening", "Structure", "Tone", "Editing", "Ending", "A sample draft"],
    closers=[
        "Feel free to send me your draft and I'll suggest specific edits.",
        "You've got this. Good luck with {piece}!",
        "Would you like me to write a first version you can then make your own?",
        "Happy writing!",
    ],
    followups=[
        "Could you write a first draft I can edit?",
        "How do I make the opening line stronger?",
        "Can you make it shorter, around half the length?",
        "Is it okay to use humour here?",
        "What title would you give it?",
    ],
)

FITNESS = Topic(
    slots={
        "goal": ["run a 5K", "get stronger", "lose a bit of weight", "improve my posture", "sleep better",
                 "train for a half marathon"],
        "time": ["twenty minutes", "half an hour", "an hour", "forty-five minutes"],
        "days": ["two", "three", "four"],
        "issue": ["a sore lower back", "knee pain when running", "a stiff neck from desk work", "tight hips",
                  "an old ankle injury"],
    },
    asks=[
        "I want to {goal}. I have {time} a day, {days} days a week. Where do I start?",
        "Can you make me a beginner workout plan to {goal}?",
        "How do I stay consistent with exercise when I work long hours?",
        "Is it better to do cardio or strength training first?",
        "How much protein do I actually need?",
        "I have {issue}. Which exercises should I avoid?",
        "How long does it take to see results if I want to {goal}?",
    ],
    context=[
        "I'm in my late thirties and haven't exercised regularly since school.",
        "I have {issue}, so I need to be a bit careful.",
        "I can only train at home with a mat and a pair of dumbbells.",
        "I tried a popular program last year but gave up after two weeks.",
        "My schedule changes a lot because of shift work.",
        "I'd prefer something I can do early in the morning.",
        "I walk about six thousand steps a day already.",
    ],
    openers=[
        "That's a great goal, and {time} {days} days a week is plenty to make real progress.",
        "Nice! The most important thing at the start is consistency, not intensity.",
        "Here is a simple plan you can adjust as you go.",
        "Good question. The answer depends on your goal, but here is a rule of thumb.",
    ],
    points=[
        "Start easier than you think you need to; finishing every session builds the habit.",
        "Increase the total amount of training by no more than about ten percent a week.",
        "Warm up for five minutes with easy movement before anything intense.",
        "Strength training twice a week helps almost every goal, including running and sleep.",
        "Squats, push-ups, rows and hip hinges cover most of the body with very little equipment.",
        "With {issue}, stop any exercise that causes sharp pain, and consider seeing a physiotherapist about it.",
        "For running, alternate one minute of jogging with two minutes of walking and gradually shift the ratio.",
        "Sleep and food matter as much as the workouts; progress happens while you recover.",
        "A common target is around 1.2 to 1.6 grams of protein per kilogram of body weight per day.",
        "Schedule workouts like appointments, at the same time each day if you can.",
        "Track something simple, like minutes or sessions completed, so you can see progress.",
        "If you miss a day, just do the next session; don't try to make up for it.",
        "Results you can feel often come in three to four weeks; results you can see usually take longer.",
        "Do cardio first if your main goal is endurance and strength first if your goal is getting stronger.",
        "Stretching after a workout feels good, though it matters less for injury prevention than people think.",
        "Walking is underrated: an extra half hour a day adds up to a lot over a month.",
        "Check with a doctor first if you have a heart condition or any serious health concern.",
    ],
    headings=["Week 1-2", "Week 3-4", "Strength days", "Cardio days", "Recovery", "Staying motivated"],
    closers=[
        "You can do this, one session at a time! 💪",
        "Let me know how the first week goes and we can adjust the plan.",
        "Listen to your body and enjoy the process.",
    ],
    followups=[
        "What should I do on rest days?",
        "How do I know if I'm pushing too hard?",
        "Can you adjust the plan for only two days a week?",
        "What should I eat before a morning workout?",
    ],
)

FINANCE = Topic(
    slots={
        "goal": ["build an emergency fund", "pay off credit card debt", "save for a house deposit",
                 "start investing", "stop living paycheck to paycheck"],
        "income": ["a modest salary", "an irregular freelance income", "two part-time jobs", "a student budget"],
        "expense": ["rent", "eating out", "subscriptions", "car payments", "childcare"],
    },
    asks=[
        "I want to {goal}. I have {income}. What's a realistic first step?",
        "How do I make a budget that I will actually stick to?",
        "Should I pay off debt first or start investing?",
        "What's an index fund, in plain English?",
        "My biggest expense is {expense}. How can I cut it without being miserable?",
        "How big should an emergency fund be?",
    ],
    context=[
        "I'm twenty-nine and I've never really tracked my spending.",
        "I have {income}, so some months are much better than others.",
        "Most of my money seems to go to {expense}.",
        "I have a small amount of savings but it's in a regular current account.",
        "I find money stressful and tend to avoid looking at my bank app.",
        "My partner and I have separate accounts, which makes planning tricky.",
    ],
    openers=[
        "It's great that you're thinking about this. A few simple habits make the biggest difference.",
        "Good question! Here is a straightforward way to think about it.",
        "This is very doable. Let's start with the basics.",
    ],
    points=[
        "Track every expense for one month without changing anything; just seeing the numbers changes behaviour.",
        "Pay yourself first: move a fixed amount to savings on payday, before you spend anything.",
        "An emergency fund of three to six months of essential expenses protects you from new debt.",
        "With {income}, base your budget on your lowest typical month rather than your average.",
        "High-interest debt, like credit cards, is usually worth paying off before investing.",
        "An index fund holds a small piece of many companies, so you own the market instead of betting on one stock.",
        "Fees matter: a difference of one percent a year compounds into a large amount over decades.",
        "Cancel subscriptions you haven't used in the last month; you can always sign up again.",
        "For {expense}, look for one big change rather than many small sacrifices.",
        "Automate as much as you can, because decisions you don't have to make are decisions you can't get wrong.",
        "Keep savings for short-term goals in a high-interest savings account, not in the stock market.",
        "Review your budget once a month; it is a plan, not a promise.",
        "This is general information, not personal financial advice, so check the rules in your country.",
        "If the debt feels overwhelming, a free non-profit debt advice service can help you make a plan.",
    ],
    headings=["Where your money goes", "Making a budget", "Debt", "Saving", "Investing basics"],
    closers=[
        "Small steady steps beat big resolutions. You've got this!",
        "If you share rough numbers, I can help you sketch a budget.",
        "Good luck, and be kind to yourself while you build the habit.",
    ],
    followups=[
        "What budgeting app would you suggest?",
        "How much should I invest each month?",
        "What if an unexpected expense wipes out my savings?",
        "Can you show an example budget with round numbers?",
    ],
)

GARDENING = Topic(
    slots={
        "plant": ["tomatoes", "basil", "a fiddle-leaf fig", "roses", "strawberries", "a lemon tree", "succulents",
                  "lavender"],
        "space": ["a small balcony", "a shady backyard", "a sunny windowsill", "a couple of raised beds",
                  "a community plot"],
        "symptom": ["yellow leaves", "brown spots", "drooping stems", "no flowers", "white powder on the leaves"],
    },
    asks=[
        "I'm growing {plant} and I'm seeing {symptom}. What's wrong?",
        "Can I grow {plant} on {space}?",
        "How often should I water {plant}?",
        "What are the easiest vegetables for a complete beginner?",
        "How do I make compost without it smelling?",
        "When should I repot {plant}?",
    ],
    context=[
        "I'm a beginner and this is my first year growing anything.",
        "My growing space is {space}, and it gets maybe four hours of direct sun.",
        "I water every morning, maybe that's too much?",
        "It was doing fine until about two weeks ago.",
        "The pot doesn't have a drainage hole, now that I think of it.",
        "We've had a very hot and dry month.",
    ],
    openers=[
        "Sorry to hear that! The good news is that {symptom} is usually fixable.",
        "Great question. {plant} can do well in the right spot.",
        "Here are the most common causes, roughly in order of likelihood.",
    ],
    points=[
        "Overwatering kills more houseplants than underwatering; let the top few centimetres of soil dry out first.",
        "Make sure the pot has drainage holes, otherwise water collects at the bottom and roots rot.",
        "{symptom} often points to a watering problem, a lack of light, or a nutrient deficiency.",
        "Water deeply and less often, so roots grow down instead of staying near the surface.",
        "Most fruiting plants need at least six hours of direct sun a day to flower well.",
        "Feed with a balanced fertiliser every few weeks during the growing season, and not at all in winter.",
        "Remove badly damaged leaves so the plant can put its energy into new growth.",
        "Repot in spring when roots circle the bottom of the pot, moving up just one size.",
        "Compost smells when it is too wet; mix in more dry brown material like cardboard or leaves.",
        "In a small space, choose compact varieties and use the largest containers you can manage.",
        "Check the undersides of leaves for pests; a strong spray of water removes many of them.",
        "Radishes, lettuce, beans and herbs like mint are very forgiving for beginners.",
        "Mulch keeps the soil cool and moist and reduces weeding.",
        "Keep a simple log of when you water and feed; patterns become obvious after a few weeks.",
    ],
    headings=["What's causing it", "What to do now", "Watering", "Light and soil", "Prevention"],
    closers=[
        "Plants are resilient; with a few changes it should bounce back. 🌱",
        "If you can describe the soil and the light in more detail, I can narrow it down.",
        "Happy gardening!",
    ],
    followups=[
        "How can I tell if the roots are rotting?",
        "Should I move it indoors for the winter?",
        "What fertiliser would you recommend?",
        "Is it safe for cats?",
    ],
)

HISTORY = Topic(
    slots={
        "era": ["the Roman Empire", "the Renaissance", "the Industrial Revolution", "the Silk Road",
                "the printing press era", "the Age of Exploration", "ancient Egypt", "the Meiji period"],
        "angle": ["everyday life", "trade", "technology", "food", "education", "medicine"],
    },
    asks=[
        "What was {angle} like during {era}?",
        "Why was {era} such an important turning point?",
        "Can you recommend a way to learn about {era} that isn't just dates and battles?",
        "What's a common myth about {era}?",
        "How do historians know about {angle} in {era}?",
    ],
    context=[
        "I'm reading a novel set in {era} and got curious.",
        "At school we only learned about kings and wars.",
        "I'm planning a museum visit and want some background.",
        "I'm particularly interested in {angle}.",
        "My grandfather used to tell stories about this and I want to know more.",
    ],
    openers=[
        "Great topic! {era} is much richer than the usual textbook summary.",
        "Historians have learned a lot about {angle} in {era} from surprising sources.",
        "Here is an overview, with a focus on {angle}.",
    ],
    points=[
        "Much of what we know about {angle} comes from letters, account "
        "books and household objects rather than official records.",
        "Most people at the time were farmers, and the rhythm of the seasons shaped daily life.",
        "Trade routes carried ideas, religions and diseases as well as goods.",
        "New technology rarely spread evenly; cities often changed decades before the countryside.",
        "Archaeology fills in gaps for people who left no written records, which was most people.",
        "The people who lived through {era} did not know it would be remembered as a turning point.",
        "Historians compare several sources and ask who wrote each one, for whom, and why.",
        "Popular myths often come from later writers who simplified the story for their own purposes.",
        "Food history is a good entry point: what people ate reveals trade, class and climate.",
        "Literacy grew unevenly, and much knowledge was still passed on by speech and by apprenticeship.",
        "Museums increasingly display everyday objects next to famous treasures, which gives a fuller picture.",
        "Local history societies and archives are often happy to help curious beginners.",
    ],
    headings=["Background", "Daily life", "Key changes", "Myths and facts", "Further reading"],
    closers=[
        "Enjoy exploring {era}! It's a fascinating period.",
        "If you like, I can suggest a few accessible books on {angle} in {era}.",
        "History gets more interesting the closer you look at ordinary people.",
    ],
    followups=[
        "What would a typical day have looked like for a child then?",
        "Which museum would you recommend for this?",
        "How did it end?",
        "Were there any women who played an important role?",
    ],
)

TOPICS = [PROGRAMMING, COOKING, TRAVEL, SCIENCE, WRITING, FITNESS, FINANCE, GARDENING, HISTORY]

# A story's worth of sentences for pasted drafts ("please proofread my story").
STORY = [
    "The train was already late when {name} reached the platform, out of breath and holding a paper cup of coffee.",
    "Nobody in the village remembered who had planted the old pear tree behind the school.",
    "Every Sunday, the market filled the square with the smell of bread, oranges and wet cardboard.",
    "{name} had promised to call back before dinner, but the phone stayed silent on the kitchen table.",
    "The letter had no return address, only a stamp with a lighthouse on it.",
    "By the time the rain stopped, the street lamps were on and the gutters were full of leaves.",
    "She counted the steps to the top of the tower, as she had done as a child, and lost count at ninety.",
    "The bakery on the corner had changed owners three times, but the bell above the door was the same.",
    "He wasn't sure whether he was more afraid of failing or of finding out that he didn't care.",
    "In the photograph, everyone was laughing except the small boy at the edge, who was looking at the sea.",
    "The workshop smelled of sawdust and oil, and the radio was always tuned to the same station.",
    "They argued about the map for twenty minutes before admitting that neither of them could read it.",
    "Snow had covered the path overnight, and the only footprints were those of a fox.",
    "{name} opened the notebook to the last page, where the handwriting became small and hurried.",
    "The meeting was supposed to take ten minutes; it lasted until the cleaners arrived.",
    "Her grandmother kept buttons in a biscuit tin and could tell you where every one of them came from.",
    "It was the kind of afternoon when the whole city seemed to be waiting for something.",
    "He practised the speech in the car, at traffic lights, until the words stopped meaning anything.",
    "The dog refused to cross the bridge, and after a while they decided the dog was probably right.",
    "When the lights came back on, the room looked smaller than it had in the dark.",
    "Nobody answered at first, and then a voice from upstairs asked who was there.",
    "On the last day of summer, {name} finally went swimming in the lake everyone talked about.",
]

# Building blocks for pasted code ("why is my script slow?").
CODE_FUNCS = [
    'def load_{n}s(path):\n    """Read {n} rows from a CSV '
    'file."""\n    rows = []\n    with open(path, newline="") as f:\n'
    '        for line in f:\n            parts = line.strip().split(",")\n            if len(parts) < 3:\n'
    '                continue\n            rows.append({{"id": '
    'parts[0], "name": parts[1], "amount": float(parts[2])}})\n'
    '    return rows\n',
    "def find_{n}(rows, {n}_id):\n    for row in rows:\n        if row[\"id\"] == {n}_id:\n            return row\n"
    "    return None\n",
    "def total_by_name(rows):\n    totals = {{}}\n    for row in "
    "rows:\n        totals[row[\"name\"]] = totals.get(row[\"name\"], 0)"
    " + row[\"amount\"]\n    return totals\n",
    "def dedupe_{n}s(rows):\n    seen = []\n    result = []\n "
    "   for row in rows:\n        if row[\"id\"] not in seen:\n"
    "            seen.append(row[\"id\"])\n            result.append(row)\n    return result\n",
    "def save_report(totals, path):\n    with open(path, \"w\") "
    "as f:\n        for name, amount in sorted(totals.items()):\n"
    "            f.write(f\"{{name}},{{amount:.2f}}\\n\")\n",
    "class {N}Cache:\n    def __init__(self):\n        self.items = {{}}\n\n    def get(self, key, loader):\n"
    "        if key not in self.items:\n            self.items[key] = loader(key)\n        return self.items[key]\n",
    "def retry(fn, attempts=3):\n    for i in range(attempts):\n        try:\n            return fn()\n"
    "        except Exception as e:\n            print(\"failed\", i, e)\n    return None\n",
    "def parse_date(text):\n    day, month, year = text.split(\"/\")\n    return int(year), int(month), int(day)\n",
    "def main():\n    rows = load_{n}s(\"data/{n}s.csv\")\n    "
    "rows = dedupe_{n}s(rows)\n    totals = total_by_name(rows)\n"
    "    save_report(totals, \"report.csv\")\n    print(\"done\", len(rows))\n",
]


# Pieces of long answers (see `series_block`).
SNIPPETS = [
    'def read_rows(path):\n    """Yield one row at a time so '
    'memory stays flat."""\n    with open(path, newline="") as f:\n'
    '        for line in f:\n            parts = line.rstrip("\\n").split(",")\n            if len(parts) == 3:\n'
    '                yield parts\n',
    "def dedupe(rows):\n    seen = set()  # a set makes each lookup constant time\n    for row in rows:\n"
    "        if row[\"id\"] not in seen:\n            seen.add(row[\"id\"])\n            yield row\n",
    "def test_total_by_name():\n    rows = [{\"name\": \"a\", \"amount\": 1.0}, {\"name\": \"a\", \"amount\": 2.5}]\n"
    "    assert total_by_name(rows) == {\"a\": 3.5}\n",
    "class ImportFailed(Exception):\n    \"\"\"Says which line "
    "could not be read.\"\"\"\n\n\ndef parse_amount(text, line_no):\n"
    "    try:\n        return float(text)\n    except ValueError:\n"
    "        raise ImportFailed(f\"line {line_no}: {text!r} is not a number\") from None\n",
    "import os\n\nDATABASE_URL = os.environ.get(\"DATABASE_URL\", \"sqlite:///local.db\")\n",
    "def chunks(items, size):\n    for start in range(0, len(items), size):\n        yield items[start:start + size]\n",
    "import logging\n\nlog = logging.getLogger(__name__)\n\n\ndef import_file(path):\n"
    "    log.info(\"importing %s\", path)\n    rows = "
    "list(read_rows(path))\n    log.info(\"read %d rows\", len(rows))\n"
    "    return rows\n",
    "from dataclasses import dataclass\n\n\n@dataclass(frozen=True)\nclass Order:\n    id: str\n    name: str\n"
    "    amount: float\n",
    "def test_dedupe_keeps_first():\n    rows = [{\"id\": 1, \"v\": \"a\"}, {\"id\": 1, \"v\": \"b\"}]\n"
    "    assert list(dedupe(rows)) == [{\"id\": 1, \"v\": \"a\"}]\n",
    "with connection:  # commits both statements or neither\n"
    "    connection.execute(\"INSERT INTO orders (id, total) VALUES (?, ?)\", (order_id, total))\n"
    "    connection.execute(\"UPDATE stock SET count = count - 1 WHERE item = ?\", (item,))\n",
]
MORNINGS = [
    "a walk through the old town before the crowds arrive", "the main food market for breakfast",
    "the best-known museum in {city}, booked for opening time", "a guided walking tour",
    "a coffee and a slow start near your apartment", "the botanical garden",
    "a viewpoint over {city} while the light is soft", "a bike ride along the river or the waterfront",
]
AFTERNOONS = [
    "lunch at a small place with a set menu, then a rest", "the modern art museum",
    "a train to a nearby town for a few hours", "browsing the independent shops in the design district",
    "a picnic in the park with food from the market", "a cooking class with local dishes",
    "the old cemetery, which is calmer and more beautiful than it sounds", "a boat trip or a ferry ride",
]
EVENINGS = [
    "dinner in a lively neighbourhood", "sunset from a rooftop terrace", "a concert or a local music night",
    "an early night after a long day", "street food and a stroll", "a traditional restaurant booked in advance",
    "a night walk past the lit-up landmarks",
]
STRENGTH = [
    "3 sets of 10 bodyweight squats", "3 sets of 8 push-ups (on your knees is fine)",
    "3 sets of 12 dumbbell rows per arm", "3 sets of 10 glute bridges", "a 30-second plank three times",
    "2 sets of 10 reverse lunges per leg", "3 sets of 10 Romanian deadlifts with light dumbbells",
    "2 sets of 12 band pull-aparts",
]
CARDIO = [
    "walk briskly for 20 minutes", "alternate 1 minute of jogging with 2 minutes of walking, 6 rounds",
    "ride a bike at an easy pace for 25 minutes", "jog an easy 3 km", "walk hills or stairs for 15 minutes",
    "swim for 30 minutes at a relaxed pace",
]
WEEK_NOTES = [
    "Keep at least one day completely free.", "If this feels easy, add one set to each exercise.",
    "Keep the pace conversational.", "Stretch gently for five minutes afterwards.",
    "Repeat the previous week if you missed more than one session.",
]
MEALS = [
    "a tray of roasted vegetables with chickpeas and a yogurt sauce", "the weekend's leftovers with a green salad",
    "a quick tomato and garlic pasta", "rice bowls with fried eggs and quick-pickled cucumber",
    "a big pot of lentil soup with crusty bread", "tacos with black beans, corn and lime",
    "baked potatoes with whatever toppings are in the fridge", "stir-fried noodles with cabbage and peanuts",
    "an omelette with herbs and toast", "sheet-pan chicken thighs with lemon and potatoes",
]


def fill(template: str, vals: dict[str, str]) -> str:
    """Fill slots, capitalising a value that starts a sentence (`{dish} is ...`)."""
    def value(match: re.Match) -> str:
        text = vals[match[2]]
        return match[1] + text[0].upper() + text[1:] if match[1] is not None else text

    return re.sub(r"(^|[.!?] )?\{(\w+)\}", value, template)


class Deck:
    """Draws sentences without repeats until the bank is used up, then reshuffles."""

    def __init__(self, rng: random.Random, items: list[str], vals: dict[str, str]):
        self.rng, self.items, self.vals, self.pending = rng, items, vals, []

    def draw(self) -> str:
        if not self.pending:
            self.pending = self.items[:]
            self.rng.shuffle(self.pending)
        return fill(self.pending.pop(), self.vals)


def target_lengths(rng: random.Random, count: int, mean: float, tail: list[int], sigma: float) -> list[int]:
    """Log-normal token counts (clipped below the tail), a fixed long tail, scaled to `mean`."""
    body = [min(rng.lognormvariate(0.0, sigma), 12.0) for _ in range(count - len(tail))]
    scale = (mean * count - sum(tail)) / sum(body)
    lengths = [max(4, round(x * scale)) for x in body] + tail
    rng.shuffle(lengths)
    return lengths


def chars(tokens: int) -> int:
    return round(tokens * CHARS_PER_TOKEN)


NOTES_HEADS = [
    "I wrote these notes for a talk. Can you turn them into a clear summary with the main points?",
    "Here are my notes from a workshop. Could you organise them into a short guide with headings?",
    "A colleague sent me this and I don't have time to read it all. Can you summarise it in five bullet points?",
]
# How a reply to a pasted document begins, by what was pasted.
PASTE_OPENERS = {
    "code": "Thanks for sharing the code! A few things stand out, "
            "starting with the one most likely behind the problem.",
    "story": "Thanks for sharing your story! The opening works well. "
             "Here are some thoughts on pacing, then a few edits.",
    "notes": "Here is a summary of the main points, grouped by theme.",
}
MIXED_NOTES_HEAD = ("I've been collecting tips from books, podcasts and friends in one long note. "
                    "Can you sort them into categories and drop anything that repeats?")
FOLLOWUP_OPENERS = ["Sure!", "Good question.", "Of course.", "Yes, here's how I'd think about it.", "Absolutely."]


WORD_NUMBERS = {"three": 3, "four": 4, "five": 5, "seven": 7, "ten": 10}


def capitalised(text: str) -> str:
    return text[0].upper() + text[1:]


class Chat:
    """One generated conversation: a topic, its slot values, and decks shared by all its turns."""

    def __init__(self, rng: random.Random, topic: Topic):
        self.rng, self.topic = rng, topic
        self.vals = {slot: rng.choice(options) for slot, options in topic.slots.items()}
        keyed = topic.keyed_points.get(next(iter(self.vals.values())), [])
        self.points = Deck(rng, topic.points + keyed, self.vals)
        self.headings = Deck(rng, topic.headings, self.vals)
        self.pasted: str | None = None  # what the first prompt pasted, if anything
        self._decks: dict[int, Deck] = {}

    def draw(self, bank: list[str]) -> str:
        """The next sentence from `bank` for this chat, so a long answer repeats as little as it can."""
        if id(bank) not in self._decks:
            self._decks[id(bank)] = Deck(self.rng, bank, self.vals)
        return self._decks[id(bank)].draw()

    def fill(self, template: str) -> str:
        return fill(template, self.vals)

    def prompt(self, tokens: int) -> str:
        """A question, padded with background about the asker; longer ones paste a document."""
        ask = self.fill(self.rng.choice(self.topic.asks))
        budget = chars(tokens)
        if budget > len(ask) + sum(map(len, self.topic.context)):
            return self.paste(budget)
        context = Deck(self.rng, self.topic.context, self.vals)
        lines: list[str] = []
        while len(" ".join(lines)) + len(ask) < budget:
            lines.append(context.draw())
        if not lines:
            return ask
        if self.rng.random() < 0.5:
            return " ".join(lines) + "\n\n" + ask
        return ask + " " + " ".join(lines)

    def paste(self, budget: int) -> str:
        """A long prompt: code to review, a story to proofread, or notes to summarise."""
        if self.topic is PROGRAMMING:
            self.pasted = "code"
            head = (f"Here is my script. It works, but {self.vals['bug']}. "
                    "Can you review it and tell me what to fix?\n\n```python\n")
            parts: list[str] = []
            while len(head) + sum(map(len, parts)) < budget:
                i = len(parts)
                noun = PROGRAMMING.slots["noun"][(i // len(CODE_FUNCS)) % len(PROGRAMMING.slots["noun"])]
                parts.append(CODE_FUNCS[i % len(CODE_FUNCS)].format(n=noun, N=noun.capitalize()) + "\n")
            return head + "\n".join(parts).rstrip() + "\n```"
        if self.topic is WRITING:
            self.pasted = "story"
            head = (f"Could you proofread this short story and tell me whether the pacing works? "
                    f"My friend {self.vals['name']} says the middle drags.\n\n")
            bank, tail = STORY, "\n\nBe honest, I can take it!"
        else:
            self.pasted = "notes"
            head, bank, tail = self.rng.choice(NOTES_HEADS) + "\n\n", self.points.items, "\n\nThanks in advance!"
        if budget > sum(map(len, bank)):  # the bank would repeat itself: paste a notebook on everything
            self.pasted, head, bank = "notes", MIXED_NOTES_HEAD + "\n\n", self.mixed_notes()
        deck, paragraphs = Deck(self.rng, bank, self.vals), []
        while len(head) + sum(map(len, paragraphs)) < budget:
            paragraphs.append(" ".join(deck.draw() for _ in range(self.rng.randint(3, 6))))
        return head + "\n\n".join(paragraphs) + tail

    def mixed_notes(self) -> list[str]:
        """Every topic's points, each topic with slot values of its own."""
        notes = []
        for topic in TOPICS:
            vals = {slot: self.rng.choice(options) for slot, options in topic.slots.items()}
            notes += [fill(point, vals) for point in topic.points]
        return notes

    def series(self, k: int) -> str | None:
        """The k-th piece of a long answer's running example: code, a day, a week, a meal, a scene."""
        rng, topic = self.rng, self.topic
        if topic is PROGRAMMING:
            intro = f"Here is a sketch in Python (the same idea carries over to {self.vals['lang']}):"
            return intro + "\n\n```python\n" + SNIPPETS[k % len(SNIPPETS)] + "```"
        if topic is TRAVEL:
            morning, afternoon, evening = (self.draw(bank) for bank in (MORNINGS, AFTERNOONS, EVENINGS))
            trip_days = WORD_NUMBERS[self.vals["days"]]
            day = f"Day {k % trip_days + 1}" + (", plan B" if k >= trip_days else "")
            return (f"**{day}.** Morning: {capitalised(morning)}. Afternoon: {capitalised(afternoon)}. "
                    f"Evening: {capitalised(evening)}.")
        if topic is FITNESS:
            s1, s2, s3 = (self.draw(STRENGTH) for _ in range(3))
            return (f"**Week {k + 1}.** On strength days, do {s1}, {s2} and {s3}. On cardio days, "
                    f"{self.draw(CARDIO)}. {self.draw(WEEK_NOTES)}")
        if topic is COOKING:
            day = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()[k % 7]
            day += f" (week {k // 7 + 1})" if k >= 7 else ""
            intro = "Since you're cooking a lot, here is a sample week that reuses ingredients:\n\n" if k == 0 else ""
            return f"{intro}**{day}:** {capitalised(self.draw(MEALS))}."
        if topic is WRITING:
            intro = "Here is a draft you can adapt:\n\n" if k == 0 else ""
            return intro + " ".join(self.draw(STORY) for _ in range(rng.randint(3, 5)))
        return None

    def answer(self, tokens: int, opener: str) -> str:
        """An assistant-style reply: opener, paragraphs and lists, headed sections when long, closer."""
        rng, budget = self.rng, chars(tokens)
        blocks, closer = [opener], self.fill(rng.choice(self.topic.closers))
        long = budget > 4000 and self.series(0) is not None
        k = 0
        while (size := sum(map(len, blocks)) + len(closer)) < budget:
            if budget - size < 250:
                blocks.append(self.points.draw())
            elif long and rng.random() < 0.5:
                blocks.append(self.series(k))
                k += 1
            elif budget > 2500 and rng.random() < 0.35:
                body = " ".join(self.points.draw() for _ in range(rng.randint(2, 3)))
                blocks.append(f"### {self.headings.draw()}\n\n{body}")
            elif rng.random() < 0.45:
                items = [self.points.draw() for _ in range(rng.randint(3, 5))]
                blocks.append("\n".join(f"{i}. {item}" for i, item in enumerate(items, 1)))
            else:
                blocks.append(" ".join(self.points.draw() for _ in range(rng.randint(2, 4))))
        return "\n\n".join(blocks + [closer])

    def turns(self, prompt_tokens: int, answer_tokens: int) -> list[dict[str, str]]:
        rng = self.rng
        prompt = self.prompt(prompt_tokens)
        opener = PASTE_OPENERS[self.pasted] if self.pasted else self.fill(rng.choice(self.topic.openers))
        turns = [turn("human", prompt), turn("gpt", self.answer(answer_tokens, opener))]
        rounds = rng.choices([0, 1, 2], weights=[15, 4, 1])[0]
        for followup in rng.sample(self.topic.followups, rounds):
            tokens = round(rng.lognormvariate(math.log(150), 0.6))
            reply = self.answer(tokens, rng.choice(FOLLOWUP_OPENERS))
            turns += [turn("human", self.fill(followup)), turn("gpt", reply)]
        return turns


def pick_topic(rng: random.Random, prompt_tokens: int, answer_tokens: int) -> Topic:
    """Very long turns go to topics with long material, so they repeat themselves less."""
    if prompt_tokens > 800:
        return rng.choice([PROGRAMMING, WRITING, SCIENCE, HISTORY])
    if answer_tokens > 500:
        return rng.choice([PROGRAMMING, TRAVEL, FITNESS, WRITING, COOKING])
    return rng.choice(TOPICS)


def chat_id(rng: random.Random) -> str:
    return "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(7))


def turn(role: str, value: str) -> dict[str, str]:
    return {"from": role, "value": value}


def handwritten_chats() -> list[list[dict[str, str]]]:
    """The odd shapes real exports contain, plus some text beyond ASCII."""
    return [
        # The assistant speaks first (a greeting or a leftover reply), then the user asks.
        [turn("gpt", "Hello! How can I help you today?"),
         turn("human", "What's a quick breakfast I can make in five minutes with eggs and spinach?"),
         turn("gpt", "Try a spinach scramble. Warm a little butter in a pan, wilt a handful of spinach for "
                     "about a minute, then pour in two beaten eggs with a pinch of salt. Stir gently over low "
                     "heat until just set, and finish with black pepper and a little grated cheese. Serve it on "
                     "toast if you want something more filling.")],
        [turn("gpt", "Sure, I can continue from where we left off."),
         turn("human", "Great. Can you remind me how to undo the last commit in git but keep my changes?"),
         turn("gpt", "Use `git reset --soft HEAD~1`. It moves the branch back by one commit and leaves your "
                     "changes staged, so you can edit them and commit again. If you have already pushed the "
                     "commit, prefer `git revert` instead, because rewriting shared history causes problems "
                     "for everyone else who pulled it.")],
        [turn("gpt", "Bonjour ! Je peux vous aider en français ou en anglais."),
         turn("human", "Merci ! Comment dit-on « I would like a coffee, please » de façon polie ?"),
         turn("gpt", "On dit : « Je voudrais un café, s'il vous plaît. » Le conditionnel « je voudrais » est "
                     "plus poli que « je veux ». Dans un café à Paris, vous pouvez aussi simplement dire « Un "
                     "café, s'il vous plaît », ce qui est tout à fait naturel.")],
        # No user turn at all: nothing to use as a prompt.
        [turn("gpt", "I'm sorry, but I can't continue this conversation.")],
        [turn("gpt", "Here is the summary you asked for earlier."),
         turn("gpt", "Let me know if you need anything else.")],
        # An empty conversation.
        [],
        # Text beyond ASCII in the prompt and the answer.
        [turn("human", "How do I say 'thank you' and 'excuse me' in Japanese? I'm visiting 東京 next month 🙂"),
         turn("gpt", "Here are the essentials:\n\n"
                     "1. ありがとうございます (arigatō gozaimasu): thank you, polite.\n"
                     "2. すみません (sumimasen): excuse me, and also a light 'sorry' or 'thanks for the "
                     "trouble'.\n3. お願いします (onegaishimasu): please, when asking for something.\n\nPeople "
                     "will appreciate the effort even if your pronunciation isn't perfect. Enjoy 東京! 🗼")],
        [turn("human", "What is the difference between 你好 and 您好 in Chinese?"),
         turn("gpt", "Both mean 'hello'. 你好 (nǐ hǎo) is the everyday form, while 您好 (nín hǎo) uses the "
                     "respectful 'you' and sounds more polite. Use 您好 with older people, customers or anyone "
                     "you want to show respect to; 你好 is fine with friends and people your own age.")],
        [turn("human", "Can you fix the accents in this sentence: 'Le cafe de Zurich sert une creme brulee "
                       "delicieuse.'"),
         turn("gpt", "Here it is with the accents: « Le café de Zürich sert une crème brûlée délicieuse. » In "
                     "French the city is usually written Zurich without the umlaut, so « Le café de Zurich » is "
                     "also correct.")],
        [turn("human", "Give me three emoji that sum up a beach holiday, and explain each one."),
         turn("gpt", "🌊 for the waves you fall asleep listening to, 🍦 for the ice cream that melts faster than "
                     "you can eat it, and 🕶️ for the sunglasses you will definitely lose at least once.")],
        # A user pasting template tokens as plain text.
        [turn("human", "In the Llama 3 chat format, what do <|start_header_id|> and <|eot_id|> do?"),
         turn("gpt", "They are special tokens. <|start_header_id|> and <|end_header_id|> wrap the role name "
                     "(system, user or assistant) at the start of each message, and <|eot_id|> marks the end of "
                     "a turn. When the model produces <|eot_id|>, the generating program knows the reply is "
                     "finished. Typed as ordinary text, as here, they should be tokenized like any other "
                     "characters rather than as the special tokens.")],
    ]


def build() -> list[dict]:
    rng = random.Random(SEED)
    prompts = target_lengths(rng, NUM_GENERATED, PROMPT_MEAN_TOKENS, PROMPT_TAIL, sigma=1.0)
    answers = target_lengths(rng, NUM_GENERATED, ANSWER_MEAN_TOKENS, ANSWER_TAIL, sigma=0.9)
    chats = [Chat(rng, pick_topic(rng, p, a)).turns(p, a) for p, a in zip(prompts, answers)]
    for chat in handwritten_chats():
        chats.insert(rng.randrange(len(chats) + 1), chat)
    return [{"id": chat_id(rng), "conversations": chat} for chat in chats]


def render() -> str:
    """The file's exact text (one key per line, so diffs of a regenerated file stay readable)."""
    return json.dumps(build(), ensure_ascii=False, indent=1) + "\n"


def main() -> None:
    OUT.write_text(render(), encoding="utf-8")
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
